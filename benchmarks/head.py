"""Head-only benchmark: forward + backward + ShardSGD step of the FC7 head on N gloo ranks (CPU).

    python benchmarks/head.py --world-size 2 --classes 100000,1000000 --sample-rates 1.0,0.1 \
        --precisions fp32,bf16 --steps 2 --memory-search --block-dtype-probe
    python benchmarks/head.py --heads arcface,adaface,subcenter3 --classes 100000 --sample-rates 0.1 \
        --no-dense-baseline     # the cost of AdaFace and sub-center K=3 next to ArcFace, same run

Precision axis (--precisions): "fp32" is the fp32 head with fp32 momentum; "bf16" / "fp16" set the head's
compute_dtype AND momentum_dtype=bf16 (the smallest state per class). The GEMM floor of a case is measured with
that case's operand dtype, so floor / step compares each head with its own precision's floor.
--weight-dtypes fp32,bf16 crosses every precision with the FC7 master weight's storage (head.weight_dtype; bf16 =
stochastically rounded updates), e.g. `--precisions bf16 --weight-dtypes fp32,bf16` measures the bf16 head with
an fp32 and with a bf16 master weight in one run.
--memory-search measures the peak RSS of one rate-0.1 step at two class counts per precision, fits
peak = fixed + per_class * classes_per_rank, and prints the largest class count (all ranks) within
--memory-cap-gb per rank (extrapolated, so the machine never has to hold the cap itself).
--block-dtype-probe times the elementwise work on one [B, c] logit block with an fp32 vs a bf16 buffer.
--weight-drift N trains the head alone (one process, learnable synthetic embeddings) for N steps with an fp32
master weight, a bf16 one (stochastic rounding, head.weight_dtype=bf16) and, for contrast, a bf16 one rounded to
nearest, and prints the loss trajectories' largest relative gap to fp32 and the final weights' relative distance
(only this runs when it is given):
    python benchmarks/head.py --weight-drift 300 --drift-classes 1000 --drift-dim 64

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

from megaface.head import AdaFaceMargin, PartialFC, ShardSGD
from megaface.head.partial_fc import WEIGHT_DTYPES
from megaface.head.softmax import COMPUTE_DTYPES

MOMENTUM_OF = {"fp32": "fp32", "bf16": "bf16", "fp16": "bf16"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gemm_floor(batch_global: int, rows: int, dim: int, reps: int, dtype: torch.dtype) -> float:
    """Best-of-`reps` seconds for the three matmuls of one step on a [rows, dim] shard in `dtype`."""
    emb = torch.randn(batch_global, dim).to(dtype)
    weight = torch.randn(rows, dim).to(dtype)
    grad_logits = torch.randn(batch_global, rows).to(dtype)
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
        head = PartialFC(case["dim"], case["classes"], sample_rate=case["sample_rate"],
                         compute_dtype=case["precision"], weight_dtype=case.get("weight_dtype", "fp32"),
                         **_head_kind(case.get("head", "arcface")))
        opt = ShardSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4, sparse=case["sparse"],
                       momentum_dtype=MOMENTUM_OF[case["precision"]])
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
        rows = head.weight.shape[0] if head.sampled_index is None else head.sampled_index.numel()  # x K
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        del head, opt
        floor = math.nan
        if case["gemm_reps"]:
            floor = _gemm_floor(case["batch"] * world, rows, case["dim"], case["gemm_reps"],
                                COMPUTE_DTYPES[case["precision"]])
        queue.put((rank, {"step_s": sum(times[case["warmup"]:]) / case["steps"], "rows": rows,
                          "peak_rss_mb": round(peak_mb, 1), "floor_s": floor}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((rank, {"error": repr(exc)}))
    finally:
        dist.destroy_process_group()


HEAD_KINDS = ("arcface", "adaface", "subcenterK (e.g. subcenter3)")


def _head_kind(name: str) -> dict:
    """--heads entry -> PartialFC keyword arguments: arcface, adaface, or subcenterK (K rows per class)."""
    if name == "arcface":
        return {"margin": "arcface"}
    if name == "adaface":
        return {"margin": AdaFaceMargin()}
    if name.startswith("subcenter") and name[len("subcenter"):].isdigit():
        return {"margin": "arcface", "subcenters": int(name[len("subcenter"):])}
    raise SystemExit(f"--heads: {name!r} is not one of {list(HEAD_KINDS)}")


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
        "world_size": world, "head": case.get("head", "arcface"), "precision": case["precision"],
        "weight_dtype": case.get("weight_dtype", "fp32"),
        "classes": case["classes"],
        "sample_rate": case["sample_rate"],
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
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--weight-dtypes", default="fp32",
                        help="comma-separated FC7 master weight dtypes (head.weight_dtype): fp32, bf16")
    parser.add_argument("--heads", default="arcface",
                        help="comma-separated: arcface, adaface, subcenterK (K rows per class, e.g. subcenter3)")
    parser.add_argument("--memory-search", action="store_true",
                        help="fit peak RSS at rate 0.1 and print the largest class count per --memory-cap-gb")
    parser.add_argument("--memory-classes", default="200000,1000000",
                        help="the two class counts (all ranks) of the memory fit")
    parser.add_argument("--memory-cap-gb", default="10,8.8", help="per-rank caps to report (GB = 1e9 bytes)")
    parser.add_argument("--weight-drift", type=int, default=0, metavar="STEPS",
                        help="head-only steps comparing an fp32, a bf16 (stochastic) and a bf16 (nearest) master weight")
    parser.add_argument("--drift-classes", type=int, default=1000)
    parser.add_argument("--drift-dim", type=int, default=64)
    parser.add_argument("--block-dtype-probe", action="store_true",
                        help="time the elementwise work on one [B, c] block with an fp32 vs a bf16 buffer")
    return parser.parse_args(argv)


def _memory_search(args: argparse.Namespace, base: dict, precision: str, weight_dtype: str = "fp32") -> dict:
    """Peak RSS of one rate-0.1 step at two class counts -> linear fit -> largest class count per cap."""
    counts = [int(c) for c in args.memory_classes.split(",")]
    peaks = []
    for classes in counts:
        # Two steps: the first creates the momentum after its backward; the second is the steady state
        # (momentum resident before the forward's rows, logit blocks and row gradients are allocated).
        case = dict(base, classes=classes, sample_rate=0.1, sparse=True, precision=precision,
                    weight_dtype=weight_dtype, steps=1, warmup=1, gemm_reps=0)
        peaks.append(max(run_case(case, args.world_size)["peak_rss_mb_per_rank"]) * 2**20)
    per_rank = [c / args.world_size for c in counts]
    per_class = (peaks[1] - peaks[0]) / (per_rank[1] - per_rank[0])
    fixed = peaks[0] - per_class * per_rank[0]
    caps = [float(c) for c in args.memory_cap_gb.split(",")]
    return {"memory_search": precision, "momentum_dtype": MOMENTUM_OF[precision], "weight_dtype": weight_dtype,
            "sample_rate": 0.1, "dim": args.dim,
            "world_size": args.world_size, "batch_per_rank": args.batch, "classes": counts,
            "peak_rss_mb_per_rank": [round(p / 2**20, 1) for p in peaks],
            "bytes_per_class": round(per_class, 1), "fixed_mb": round(fixed / 2**20, 1),
            "max_classes": {f"{cap}GB": int((cap * 1e9 - fixed) / per_class) * args.world_size for cap in caps}}


def _block_dtype_probe(batch_global: int, reps: int = 20) -> dict:
    """Seconds per [B, c] block (the head's CPU block) for the non-GEMM work with either buffer dtype:
    scale, max, exp, sum-exp (forward), the two row/column scalings and the cast to the GEMM operand dtype."""
    from megaface.head.softmax import CPU_BLOCK_ELEMENTS

    width = max(256, CPU_BLOCK_ELEMENTS // batch_global)
    raw = torch.randn(batch_global, width).bfloat16()  # what a bf16 GEMM returns
    col, row = torch.rand(width) * 64, torch.rand(batch_global, 1)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            block = raw.to(dtype).mul_(col) if dtype != raw.dtype else raw.mul(col)
            block.sub_(block.amax(dim=1, keepdim=True)).exp_()
            block.sum(dim=1, dtype=torch.float32)
            block.mul_(row).mul_(col).to(torch.bfloat16)
            best = min(best, time.perf_counter() - start)
        out[name] = best
    return {"block_dtype_probe": [batch_global, width], "fp32_buffer_s": round(out["fp32"], 6),
            "bf16_buffer_s": round(out["bf16"], 6), "bf16_over_fp32": round(out["bf16"] / out["fp32"], 3)}


def _drift_run(weight_dtype: str, nearest: bool, steps: int, classes: int, dim: int, rate: float) -> tuple:
    """(losses, final weight) of `steps` head-only steps; bf16 momentum and fp32 compute in every arm."""
    from unittest import mock

    from megaface.head import optim

    head = PartialFC(dim, classes, margin="arcface", scale=32.0, sample_rate=rate, seed=0, weight_dtype=weight_dtype)
    opt = ShardSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4, momentum_dtype="bf16")
    centers = torch.nn.functional.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(1)))
    rounding = (lambda x, *args: x.bfloat16()) if nearest else optim.stochastic_round_bf16
    losses = []
    with mock.patch.object(optim, "stochastic_round_bf16", rounding):
        for step in range(steps):
            gen = torch.Generator().manual_seed(100 + step)
            labels = torch.randint(0, classes, (64,), generator=gen)
            emb = centers[labels] + 0.7 * torch.randn(64, dim, generator=gen) / dim ** 0.5
            loss = head(emb, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return losses, head.weight.detach().double()


def _weight_drift(steps: int, classes: int, dim: int, rate: float = 0.2) -> list[dict]:
    ref_losses, ref_weight = _drift_run("fp32", False, steps, classes, dim, rate)
    out = []
    for name, weight_dtype, nearest in (("fp32", "fp32", False), ("bf16_stochastic", "bf16", False),
                                        ("bf16_nearest", "bf16", True)):
        losses, weight = _drift_run(weight_dtype, nearest, steps, classes, dim, rate)
        out.append({"weight_drift": name, "steps": steps, "classes": classes, "dim": dim, "sample_rate": rate,
                    "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
                    "max_rel_loss_gap_to_fp32": round(max(abs(a - b) / b for a, b in zip(losses, ref_losses, strict=True)), 5),
                    "final_weight_rel_dist_to_fp32": round(float((weight - ref_weight).norm() / ref_weight.norm()), 5)})
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.weight_drift:  # a mode of its own: one process, no forked cases
        torch.set_num_threads(args.threads)
        for line in _weight_drift(args.weight_drift, args.drift_classes, args.drift_dim):
            print(json.dumps(line), flush=True)
        return 0
    classes = [int(c) for c in args.classes.split(",")]
    rates = [float(r) for r in args.sample_rates.split(",")]
    base = {"dim": args.dim, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "threads": args.threads, "gemm_reps": args.gemm_reps}
    precisions = args.precisions.split(",")
    for precision in precisions:
        if precision not in COMPUTE_DTYPES:
            raise SystemExit(f"--precisions: {precision!r} is not one of {sorted(COMPUTE_DTYPES)}")
    heads = args.heads.split(",")
    for name in heads:
        _head_kind(name)  # a bad name fails before any case runs
    weight_dtypes = args.weight_dtypes.split(",")
    for name in weight_dtypes:
        if name not in WEIGHT_DTYPES:
            raise SystemExit(f"--weight-dtypes: {name!r} is not one of {sorted(WEIGHT_DTYPES)}")
    cases = [dict(base, classes=c, sample_rate=r, sparse=True, precision=p, weight_dtype=w, head=h)
             for c in classes for r in rates for p in precisions for w in weight_dtypes for h in heads]
    if not args.no_dense_baseline:
        cases += [dict(base, classes=max(classes), sample_rate=r, sparse=False, precision=p, weight_dtype=w)
                  for r in rates if r < 1.0 for p in precisions for w in weight_dtypes]
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    for case in cases:
        print(json.dumps(run_case(case, args.world_size)), flush=True)
    if args.memory_search:
        for precision in precisions:
            for weight_dtype in weight_dtypes:
                print(json.dumps(_memory_search(args, base, precision, weight_dtype)), flush=True)
    if args.block_dtype_probe:  # after every fork: the parent may now run torch ops itself
        torch.set_num_threads(args.threads)
        print(json.dumps(_block_dtype_probe(args.batch * args.world_size)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
