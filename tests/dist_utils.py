"""Run a function on W gloo ranks in forked processes and collect each rank's return value.

Forking (instead of spawning) reuses the test process's imports, so a 2-rank case starts in about a second.
The function must be a module-level callable; it receives a `DistState` followed by `args`.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from megaface.distributed import DistState


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    torch.set_num_threads(1)
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                init_method=f"tcp://127.0.0.1:{port}")
        state = DistState(rank, world, rank, world, torch.device("cpu"), None)
        result = fn(state, *args)
        dist.barrier()
        # serialise by value: tensors sent through a Queue travel as shared-memory handles that vanish
        # when this process exits before the parent reads them
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Return [fn(state_0, *args), ..., fn(state_{W-1}, *args)]; re-raise the first rank's error.

    World size 1 runs in-process without any process group, exercising the single-process path.
    """
    if world_size == 1:
        return [fn(DistState(), *args)]
    # The first optimizer a process builds imports torch._dynamo (~5-10 s); import it once here so the
    # forked ranks inherit it instead of each paying for it.
    import torch._dynamo  # noqa: F401

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed test failed on " + "\n".join(errors))
    return [results[r] for r in range(world_size)]
