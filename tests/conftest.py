"""Shared test helpers (imported as `from tests.conftest import ...`) and fixtures.

- `free_port`, `run_distributed`: run a function on W gloo ranks in forked processes (forking reuses the test
  process's imports, so a 2-rank case starts in about a second) and collect each rank's return value;
- `ROOT`, `QUICKSTART`, `tiny_args`, `train_worker`, `wrapped`: a few-second `megaface train` in-process;
- `_torchrun`, `_rank_pids`: a real torchrun job in its own session, and its rank processes;
- `run_under_pty`: a command under a pseudo-terminal, as a person at a terminal runs it.
Reference implementations of other projects' code and file fixtures live in tests/support/.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import multiprocessing as mp
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import deepspeed  # noqa: F401  - imported before forking so that each rank starts in about a second
import numpy as np
import pytest
import torch
import torch.distributed as dist

from megaface import train
from megaface.checkpoint import load_backbone
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


ROOT = Path(__file__).resolve().parents[1]


QUICKSTART = ROOT / "launch" / "configs" / "quickstart.yaml"


def tiny_args(cache: Path, output: Path, steps: int, *extra: str, micro: int = 4) -> list[str]:
    """A few-second run: 24 synthetic identities, micro batch `micro`, no workers, no tensorboard."""
    return ["--config", str(QUICKSTART), "--output", str(output), "--max-steps", str(steps),
            f"--ds.train_micro_batch_size_per_gpu={micro}", "--validation.interval=0",
            "--data.synthetic.identities=24", "--data.synthetic.images_per_identity=8",
            "--data.synthetic.val_pairs=40", f"--data.cache_dir={cache}", "--data.workers=0",
            "--train.log_every=1", "--train.tensorboard=false", "--train.keep_last=0", "--optim.warmup_steps=0",
            "--optim.milestones=[]", "--train.progress=off", *extra]


@contextlib.contextmanager
def wrapped(owner: Any, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Replace `owner.name` by `make_wrapper(original)` for the duration of the block."""
    original = getattr(owner, name)
    setattr(owner, name, make_wrapper(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def train_worker(state: DistState, argv: list[str]) -> dict[str, Any]:
    """Rank body: run the CLI in this process; return its exit code and the per-iteration losses."""
    from megaface.train import logger as logging_utils

    losses: list[float] = []

    def recording(original: Callable[..., Any]) -> Callable[..., Any]:
        def record(self, iteration, loss, *args, **kwargs):  # type: ignore[no-untyped-def]
            losses.append(loss)
            return original(self, iteration, loss, *args, **kwargs)
        return record

    with wrapped(logging_utils.TrainLogger, "iteration", recording):
        code = train.main(argv)
    return {"code": code, "losses": losses}


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def _torchrun(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megaface", "train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _rank_pids(launcher: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def run_under_pty(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120.0) -> tuple[int, str]:
    """Run `argv` with stdin/stdout/stderr on a fresh pty (size 0x0, as script(1) gives); -> (rc, output)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, close_fds=True,
                            env={**os.environ, **(env or {})})
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    rc = proc.wait(timeout=10)
    return rc, b"".join(chunks).decode("utf-8", "replace")


def commands(paths: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(label the progress shows, argv) of each long command."""
    root = Path(paths["root"])
    model = ["--checkpoint", paths["ckpt"], "--batch-size", "4"]
    return [("pack", ["pack", "rec", "--images", paths["images"], "--output", str(root / "pack"), "--workers", "2"]),
            ("pack", ["pack", "ofrecord", "--input", str(root / "pack"), "--output", str(root / "ofr")]),
            ("embed", ["embed", *model, "--pack", str(root / "pack"), "--output", str(root / "emb.npy")]),
            ("eval lfw", ["eval", *model, "--bin", paths["bin"], "--folds", "2"]),
            ("fc7 reshard", ["convert", "fc7", paths["tag"], "--reshard", "3", "-o", str(root / "w3")])]


FIXTURES = Path(__file__).parent / "fixtures" / "interop"


MODELS = {"y1": "mobilefacenet", "r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100"}


MIN_COSINE = 0.9999


def megaface_embeddings(backbone: Path) -> np.ndarray:
    """Embeddings of the fixture images, normalised as the import's meta says (the symbol's own (x-127.5)/128)."""
    model, meta = load_backbone(backbone)
    assert meta["normalize"] == "oneflow"
    images = torch.from_numpy(np.load(FIXTURES / "images.npy").astype(np.float32))
    with torch.no_grad():
        return model.eval()(((images - 127.5) / 128.0)).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def params_or_skip(name: str, tmp_path: Path) -> Path:
    """The MXNet prefix of fixture `name`: its own directory when make.sh has written the .params there, else
    a copy in `tmp_path` with the committed model-0000.params.xz decompressed (the bytes MXNet wrote)."""
    prefix = FIXTURES / name / "model"
    if Path(f"{prefix}-0000.params").is_file():
        return prefix
    packed = Path(f"{prefix}-0000.params.xz")
    if not packed.is_file():
        pytest.skip(f"{name}'s MXNet weights are absent; regenerate them with "
                    "INSIGHTFACE=... ONEFLOW_FACE=... bash tests/fixtures/interop/make.sh " + name)
    out = tmp_path / f"mxnet_{name}" / "model"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURES / name / "model-symbol.json", f"{out}-symbol.json")
    with lzma.open(packed) as src, open(f"{out}-0000.params", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out


def snapshot_or_skip(name: str, tmp_path: Path) -> Path:
    """oneflow_face's converter snapshot of fixture `name`: the directory make.sh wrote, else the committed
    oneflow/<name>_snapshot.tar.xz extracted into `tmp_path`."""
    snapshot = FIXTURES / "oneflow" / f"{name}_snapshot"
    if snapshot.is_dir():
        return snapshot
    packed = FIXTURES / "oneflow" / f"{name}_snapshot.tar.xz"
    if not packed.is_file():
        pytest.skip(f"{snapshot} is absent; regenerate it with "
                    "INSIGHTFACE=... ONEFLOW_FACE=... bash tests/fixtures/interop/make.sh " + name)
    with tarfile.open(packed) as tar:
        tar.extractall(tmp_path / "oneflow", filter="data")
    return tmp_path / "oneflow" / f"{name}_snapshot"


def _child(args: list[str], log: str, queue: "mp.Queue[int]", hook: Callable[[], None] | None) -> None:
    from megaface import train

    with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        if hook is not None:
            hook()
        queue.put(train.main(args))


def _train(args: list[str], hook: Callable[[], None] | None = None) -> tuple[int, str, float]:
    """(exit code, output, seconds) of the CLI in a forked child (DeepSpeed keeps per-process state)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        started = time.time()
        child = ctx.Process(target=_child, args=(args, log.name, queue, hook))
        child.start()
        child.join(timeout=400)
        code = queue.get(timeout=5) if child.exitcode == 0 else -1
        return code, Path(log.name).read_text(), time.time() - started
