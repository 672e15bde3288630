"""Head-only benchmark: forward + backward + ShardSGD step of the FC7 head on N gloo ranks (CPU).

    python benchmarks/head.py --world-size 2 --classes 100000,1000000 --sample-rates 1.0,0.1,0.01 --steps 3

Every case runs in fresh processes forked from this (torch-importing but otherwise idle) parent, so the peak
RSS belongs to that case (it includes the ~0.3 GB of the imported libraries), and prints one JSON line:
seconds per step (slowest rank), samples/s over the global batch, peak RSS per rank, the sampled rows per
rank, and - measured in the same processes right after the steps - the GEMM floor: the three plain matmuls a
step cannot avoid on one rank's (sampled) shard (logits [B, k] = E @ W^T, dE = G @ W, dW = G^T @ E), and
floor / step. At the largest class count, rates < 1 are also run with the dense update (sparse=False) so the
cost of updating every row is measured next to the sparse update.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import socket
import sys
import time

import torch
import torch._dynamo  # noqa: F401 - imported by torch.optim.Optimizer(); load once before forking the ranks
import torch.distributed as dist

from megaface.head import PartialFC, ShardSGD


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gemm_floor(batch_global: int, rows: int, dim: int, reps: int) -> float:
    """Best-of-`reps` seconds for the three matmuls of one step on a [rows, dim] shard."""
    emb = torch.randn(batch_global, dim)
    weight = torch.randn(rows, dim)
    grad_logits = torch.randn(batch_global, rows)
    best = math.inf
    for _ in range(reps):
        dist.barrier()  # all ranks multiply at once, as in a step (they share the cores)
        start = time.perf_counter()
        torch.matmul(emb, weight.t())
        torch.matmul(grad_logits, weight)
        torch.matmul(grad_logits.t(), emb)
        best = min(best, time.perf_counter() - start)
    return best


def _labels(step: int, rank: int, batch: int, classes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step * 1009 + rank)
    return torch.randint(0, classes, (batch,), generator=gen)


def _worker(rank: int, world: int, port: int, case: dict, queue: mp.Queue) -> None:
    torch.set_num_threads(case["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        head = PartialFC(case["dim"], case["classes"], sample_rate=case["sample_rate"])
        opt = ShardSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4, sparse=case["sparse"])
        emb = torch.randn(case["batch"], case["dim"], generator=torch.Generator().manual_seed(rank))
        emb.requires_grad_(True)
        times = []
        for step in range(case["warmup"] + case["steps"]):
            labels = _labels(step, rank, case["batch"], case["classes"])
            dist.barrier()
            start = time.perf_counter()
            head(emb, labels).backward()
            opt.step()
            opt.zero_grad()
            emb.grad = None
            times.append(time.perf_counter() - start)
        rows = head.num_local if head.sampled_index is None else head.sampled_index.numel()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        del head, opt
        floor = _gemm_floor(case["batch"] * world, rows, case["dim"], case["gemm_reps"])
        queue.put((rank, {"step_s": sum(times[case["warmup"]:]) / case["steps"], "rows": rows,
                          "peak_rss_mb": round(peak_mb, 1), "floor_s": floor}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((rank, {"error": repr(exc)}))
    finally:
        dist.destroy_process_group()


def run_case(case: dict, world: int) -> dict:
    ctx = mp.get_context("fork")  # the parent never runs torch ops, so forking is safe and starts fast
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, case, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in range(world))
    for p in procs:
        p.join()
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        raise RuntimeError(f"case {case} failed: {errors}")
    ranks = [results[r] for r in range(world)]
    step_s = max(r["step_s"] for r in ranks)
    floor_s = max(r["floor_s"] for r in ranks)
    return {
        "world_size": world, "classes": case["classes"], "sample_rate": case["sample_rate"],
        "sparse": case["sparse"], "dim": case["dim"], "batch_per_rank": case["batch"],
        "sampled_rows_per_rank": [r["rows"] for r in ranks], "steps": case["steps"],
        "threads_per_rank": case["threads"], "seconds_per_step": round(step_s, 4),
        "samples_per_s": round(case["batch"] * world / step_s, 1),
        "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
        "gemm_floor_s": round(floor_s, 4), "gemm_floor_ratio": round(floor_s / step_s, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews both timings
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--classes", default="100000,1000000", help="comma-separated class counts")
    parser.add_argument("--sample-rates", default="1.0,0.1,0.01", help="comma-separated Partial FC rates")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128, help="samples per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--gemm-reps", type=int, default=2)
    parser.add_argument("--no-dense-baseline", action="store_true",
                        help="skip the sparse=False cases at the largest class count")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    classes = [int(c) for c in args.classes.split(",")]
    rates = [float(r) for r in args.sample_rates.split(",")]
    base = {"dim": args.dim, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "threads": args.threads, "gemm_reps": args.gemm_reps}
    cases = [dict(base, classes=c, sample_rate=r, sparse=True) for c in classes for r in rates]
    if not args.no_dense_baseline:
        cases += [dict(base, classes=max(classes), sample_rate=r, sparse=False) for r in rates if r < 1.0]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    for case in cases:
        print(json.dumps(run_case(case, args.world_size)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
