"""A communication model of one training step, megaface against arcface_torch, from 8 to 512 GPUs.

    python benchmarks/scale_model.py --network iresnet100 --classes 2000000 --batch 128 --sample-rate 0.1 \
        --bandwidth-gbs 25 --latency-us 8 [--markdown]
    python benchmarks/scale_model.py --check          # the model against measured gloo steps at W = 2 and 3

Every collective of a step is listed with its size, and costed with the alpha-beta model of the algorithm a
collective library uses for it (per rank: latency alpha per message hop, 1/beta per byte on the link):
    all-reduce      ring 2(W-1) alpha + 2(W-1)/W n/beta, or tree 2 log2(W) alpha + 2 n/beta when cheaper
    all-gather /    (W-1) alpha + (W-1)/W n/beta       (n = the gathered / the reduced tensor's bytes)
    reduce-scatter
    reduce          (W-1) alpha + (W-1)/W n/beta       (ring, to one root)
A step of megaface (model-parallel FC7, `megaface/head/partial_fc.py`): all-gather of the embeddings
[B, D] and labels [B], all-reduce of the softmax max [B] and of (sum-exp, target) [2, B], reduce-scatter of
the embedding gradient [B, D], and the backbone's gradient exchange under the ZeRO stage (0: all-reduce;
1/2: reduce-scatter of gradients + all-gather of the updated parameters; 3: also an all-gather of the
parameters in forward and in backward). A step of arcface_torch (`partial_fc_v2.py` + DDP with the fp16
compression hook, its train_v2.py): all-gather of embeddings and labels, three all-reduces of [B] (max, sum,
loss), and a backward made of W separate reduces of [B/W, D] (one per rank), then the DDP all-reduce of the
fp16-compressed backbone gradient. B is the global batch. Compute is not modelled: the table says where the
head's communication overtakes the backbone's, and what each trainer pays as W grows.

`--check` fits alpha and beta to loopback gloo here (all-reduces and all-gathers of 4 B .. 1 MB, the sizes
of the checked step, by least squares on the relative error), predicts the communication of a real megaface
train step at W = 2 and 3 (mobilefacenet_tiny, ZeRO-0 fp32: the collectives `megaface_step` lists), and
compares it with the time inside that step's torch.distributed collectives, each timed after a barrier so that
a rank's wait for a slower one (compute skew) is not counted as communication. It prints the collectives it
measured (and whether they are the model's), the fit, both times and their ratio. On a shared machine both
sides take each call's least time over repetitions (docs/scaling.md says why and what is left).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclass(frozen=True)
class Link:
    """Per-rank link: latency per message hop (s) and bandwidth (bytes/s)."""

    alpha: float
    beta: float


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter | reduce
    nbytes: float  # the full tensor (gathered / reduced), bytes
    count: int = 1  # how many such collectives per step
    part: str = "head"  # head | backbone


def cost(c: Collective, world: int, link: Link) -> float:
    """Seconds for `c.count` collectives of this kind and size (see the module docstring)."""
    if world == 1:
        return 0.0
    w, n = world, c.nbytes
    if c.kind == "all_reduce":
        ring = 2 * (w - 1) * link.alpha + 2 * (w - 1) / w * n / link.beta
        tree = 2 * math.ceil(math.log2(w)) * link.alpha + 2 * n / link.beta
        one = min(ring, tree)
    elif c.kind in ("all_gather", "reduce_scatter", "reduce"):
        one = (w - 1) * link.alpha + (w - 1) / w * n / link.beta
    else:
        raise ValueError(f"unknown collective {c.kind!r}")
    return c.count * one


def wire_bytes(c: Collective, world: int) -> float:
    """Bytes each rank sends for `c.count` collectives (ring algorithms)."""
    factor = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "reduce": 1.0}[c.kind]
    return c.count * factor * (world - 1) / world * c.nbytes


def megaface_step(world: int, batch: int, dim: int, params: int, zero: int, act_bytes: int, grad_bytes: int,
                  param_bytes: int, clip: bool = False, gloo: bool = False) -> list[Collective]:
    """The collectives of one megaface step; `batch` is per rank (global B = batch * world).

    gloo has no reduce-scatter: megaface.distributed.comm all-reduces there and keeps its rows (`gloo=True`)."""
    b = batch * world
    out = [Collective("all_gather", b * dim * act_bytes), Collective("all_gather", b * 8),
           Collective("all_reduce", b * 4), Collective("all_reduce", 2 * b * 4),
           Collective("all_reduce" if gloo else "reduce_scatter", b * dim * act_bytes)]
    if clip:
        out.append(Collective("all_reduce", 4))
    p = "backbone"
    if zero == 0:
        out.append(Collective("all_reduce", params * grad_bytes, part=p))
    else:
        out += [Collective("reduce_scatter", params * grad_bytes, part=p),
                Collective("all_gather", params * param_bytes, part=p)]
        if zero == 3:
            out.append(Collective("all_gather", params * param_bytes, count=2, part=p))
    return out


def arcface_torch_step(world: int, batch: int, dim: int, params: int, act_bytes: int) -> list[Collective]:
    """The collectives of one arcface_torch train_v2 step (PartialFC_V2, DDP with the fp16 hook)."""
    b = batch * world
    return [Collective("all_gather", b * dim * act_bytes), Collective("all_gather", b * 8),
            Collective("all_reduce", b * 4, count=3),
            Collective("reduce", b / world * dim * act_bytes, count=world),
            Collective("all_reduce", params * 2, part="backbone")]


def step_table(world: int, args: argparse.Namespace, params: int, link: Link) -> dict[str, Any]:
    mf = megaface_step(world, args.batch, args.embedding_size, params, args.zero, args.act_bytes, args.grad_bytes,
                       args.param_bytes, args.clip)
    at = arcface_torch_step(world, args.batch, args.embedding_size, params, args.act_bytes)

    def part(cs: list[Collective], name: str) -> tuple[float, float]:
        chosen = [c for c in cs if c.part == name]
        return sum(cost(c, world, link) for c in chosen), sum(wire_bytes(c, world) for c in chosen)

    (mf_head, mf_head_b), (mf_bb, mf_bb_b) = part(mf, "head"), part(mf, "backbone")
    (at_head, at_head_b), (at_bb, at_bb_b) = part(at, "head"), part(at, "backbone")
    return {"world_size": world, "global_batch": args.batch * world,
            "megaface_head_ms": round(1e3 * mf_head, 3), "megaface_backbone_ms": round(1e3 * mf_bb, 3),
            "megaface_head_MB": round(mf_head_b / 1e6, 3), "megaface_backbone_MB": round(mf_bb_b / 1e6, 1),
            "arcface_torch_head_ms": round(1e3 * at_head, 3), "arcface_torch_backbone_ms": round(1e3 * at_bb, 3),
            "arcface_torch_head_MB": round(at_head_b / 1e6, 3),
            "arcface_torch_backbone_MB": round(at_bb_b / 1e6, 1),
            "megaface_head_overtakes_backbone": mf_head > mf_bb}


def count_params(network: str) -> int:
    from megaface.models import build_model

    return sum(p.numel() for p in build_model(network).parameters())


# ---- the check against gloo here ------------------------------------------------------------------------

CALIBRATION_BYTES = (4, 256, 4 << 10, 32 << 10, 256 << 10, 1 << 20)
"""The sizes of a checked step's collectives (256 B .. 570 KB): the fit is made where the step lives."""
CALIBRATION_KINDS = ("all_reduce", "all_gather")


def _calibrate(state: Any, repeats: int) -> dict[str, Any]:
    """Seconds of all-reduces and all-gathers of each CALIBRATION_BYTES size (float32) on this rank, each after a
    barrier (as the step's collectives are measured): the least of `repeats` calls, as many as the measured
    steps (a shared machine delays some calls by whole scheduler slices; the least of n is the closest to an
    idle machine's time, and it falls with n, so both sides take it over the same n)."""
    import torch
    import torch.distributed as dist

    out = {}
    for kind in CALIBRATION_KINDS:
        for nbytes in CALIBRATION_BYTES:
            n = max(1, nbytes // 4)
            full = torch.ones(n if kind == "all_reduce" else max(state.world_size, n - n % state.world_size))
            part = full[:full.numel() // state.world_size].clone()
            times = []
            for k in range(repeats + 2):
                dist.barrier()
                t = time.perf_counter()
                if kind == "all_reduce":
                    dist.all_reduce(full)
                else:
                    dist.all_gather_into_tensor(full, part)
                if k >= 2:
                    times.append(time.perf_counter() - t)
            out[f"{kind}:{full.numel() * 4}"] = min(times)
    return out


def fit_link(world: int, medians: dict[tuple[str, int], float]) -> Link:
    """alpha, beta from collective times t = h(W) alpha + g(W) n / beta (the formulas of `cost`, ring), by least
    squares on the relative error: the small, latency-bound sizes count as much as the large ones."""
    rows = []
    for (kind, n), t in medians.items():
        hops, share = (2 * (world - 1), 2 * (world - 1) / world) if kind == "all_reduce" else \
            (world - 1, (world - 1) / world)
        rows.append((hops / t, share * n / t))  # divided by t: the residual is relative
    saa = sum(h * h for h, _ in rows)
    sab = sum(h * g for h, g in rows)
    sbb = sum(g * g for _, g in rows)
    sa, sb = sum(h for h, _ in rows), sum(g for _, g in rows)
    det = saa * sbb - sab * sab
    alpha, inv_beta = (sa * sbb - sb * sab) / det, (saa * sb - sab * sa) / det
    return Link(alpha=max(alpha, 1e-7), beta=1.0 / max(inv_beta, 1e-13))


_CALLS: list[tuple[str, int, float]] = []  # (collective, bytes, seconds) of the running step, this rank
_LOGGED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
           "broadcast", "reduce", "all_to_all_single")


def _log_collectives_after_a_barrier() -> None:
    """Route torch.distributed's collectives through a barrier, then time and log them: what the model costs
    is the transfer once every rank has arrived, not a rank's wait for a slower one (compute skew)."""
    import inspect

    import torch
    import torch.distributed as dist

    if getattr(dist, "_megaface_scale_logged", False):
        return
    dist._megaface_scale_logged = True  # type: ignore[attr-defined]
    barrier = dist.barrier
    for name in _LOGGED:
        original = getattr(dist, name, None)
        if original is None:
            continue
        signature = inspect.signature(original)

        def logged(*args: Any, __name: str = name, __original: Any = original, __sig: Any = signature,
                   **kwargs: Any) -> Any:
            bound = __sig.bind(*args, **kwargs).arguments
            tensors = [v for v in bound.values() if isinstance(v, torch.Tensor)]
            lists = [v for v in bound.values() if isinstance(v, list)]
            nbytes = max([t.numel() * t.element_size() for t in tensors]  # the full (gathered, reduced) size
                         + [sum(t.numel() * t.element_size() for t in v) for v in lists], default=0)
            barrier(group=bound.get("group"))
            t = time.perf_counter()
            out = __original(*args, **kwargs)
            if bound.get("async_op"):
                out.wait()
            _CALLS.append((__name, nbytes, time.perf_counter() - t))
            return out
        setattr(dist, name, logged)
    import megaface.distributed.comm as comm  # binds all_gather_into_tensor / reduce_scatter_tensor at import
    comm._all_gather_single = dist.all_gather_into_tensor
    comm._reduce_scatter_single = dist.reduce_scatter_tensor


def _measure_step(state: Any, case: dict[str, Any], data_root: Path) -> dict[str, Any]:
    """Per measured step on this rank: each collective's name, bytes and seconds (after a barrier)."""
    import train_step as ts

    _log_collectives_after_a_barrier()
    parts, loader = ts.build_case(state, case, data_root)
    batches = ts._batches(loader, max(1, case["classes"] // case["identities"]))
    from megaface.train.step import train_step

    steps = []
    for k in range(case["warmup"] + case["steps"]):
        images, labels = next(batches)
        _CALLS.clear()
        train_step(parts, images, labels)
        if k >= case["warmup"]:
            steps.append(list(_CALLS))
    return {"steps": steps, "params": sum(p.numel() for p in parts.backbone.parameters())}


KIND = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}


def check(args: argparse.Namespace) -> int:
    """The model's communication of a megaface step against the same step measured on gloo here: each
    collective's time after a barrier (no wait for a slower rank), summed per step, on the least-delayed rank."""
    import os
    import tempfile

    import train_step as ts

    worst = 0.0
    load = os.getloadavg()
    for world in (2, 3):
        calib = next(ts.run_on_ranks([args.check_steps], world, 1, _calibrate))[1]
        assert calib is not None
        medians = {(k.split(":")[0], int(k.split(":")[1])): min(r[k] for r in calib) for k in calib[0]}
        link = fit_link(world, medians)
        case = {"network": args.check_network, "precision": "fp32", "items": [], "batch": args.check_batch,
                "classes": args.check_classes, "sample_rate": 1.0, "embedding_size": None, "identities": 64,
                "workers": 0, "world_size": world, "threads": 1, "warmup": 2,
                "ds_config": ROOT / "ds_configs" / "zero0_fp32.json",  # backbone: one all-reduce, as modelled
                "steps": args.check_steps}
        run = functools.partial(_measure_step, data_root=Path(tempfile.mkdtemp(prefix="megaface-scale-")))
        ranks = next(ts.run_on_ranks([case], world, 1, run))[1]
        assert ranks is not None
        calls = [(KIND.get(name, name), nbytes) for name, nbytes, _ in ranks[0]["steps"][0]]
        per_call = [[min(r["steps"][k][i][2] for r in ranks) for i in range(len(calls))]
                    for k in range(args.check_steps)]
        least = [min(step[i] for step in per_call) for i in range(len(calls))]  # each call's least delayed
        measured = sum(least)
        median_step = statistics.median(sum(step) for step in per_call)
        dim = 128 if "mobilefacenet" in args.check_network else 512
        step = megaface_step(world, args.check_batch, dim, ranks[0]["params"], 0, 4, 4, 4, gloo=True)
        modelled = sorted((c.kind, int(c.nbytes)) for c in step for _ in range(c.count))
        predicted = sum(cost(c, world, link) for c in step)
        ratio = predicted / measured
        worst = max(worst, abs(ratio - 1))
        print(json.dumps({
            "case": "check", "world_size": world, "network": args.check_network, "batch_per_rank": args.check_batch,
            "classes": args.check_classes,
            "compared": f"the model's collectives of one step (alpha, beta fitted to the least time of "
                        f"{args.check_steps} gloo calls per size) vs the time inside the step's torch.distributed "
                        f"collectives, each after a barrier, each call's least over {args.check_steps} steps, summed",
            "collectives_measured": [f"{k}:{n}" for k, n in calls],
            "collectives_match_the_model": sorted(calls) == modelled,
            "fit": f"all_reduce + all_gather of {CALIBRATION_BYTES[0]}..{CALIBRATION_BYTES[-1]} B, relative least squares",
            "calibration_us": {f"{k}:{n}": round(t * 1e6, 1) for (k, n), t in medians.items()},
            "alpha_us": round(link.alpha * 1e6, 2), "beta_GBs": round(link.beta / 1e9, 3),
            "predicted_ms": round(predicted * 1e3, 3), "measured_ms": round(measured * 1e3, 3),
            "measured_per_call_ms": [round(t * 1e3, 3) for t in least],
            "predicted_over_measured": round(ratio, 3),
            "median_step_ms": round(median_step * 1e3, 3),  # with the delays of a loaded machine: not compared
            "predicted_over_median_step": round(predicted / median_step, 3)}), flush=True)
    print(json.dumps({"case": "check", "worst_relative_error": round(worst, 3), "within_30_percent": worst <= 0.3,
                      "load_average_at_start": [round(x, 2) for x in load], "load_average_at_end":
                      [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count()}))
    return 0 if worst <= 0.3 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", default="iresnet100")
    ap.add_argument("--params", type=int, default=None, help="backbone parameters (default: counted on --network)")
    ap.add_argument("--batch", type=int, default=128, help="per-GPU batch")
    ap.add_argument("--embedding-size", type=int, default=512)
    ap.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3))
    ap.add_argument("--act-bytes", type=int, default=2, help="embedding bytes per value (bf16/fp16: 2)")
    ap.add_argument("--grad-bytes", type=int, default=4, help="backbone gradient bytes on the wire (fp32: 4)")
    ap.add_argument("--param-bytes", type=int, default=2, help="parameter bytes of the ZeRO all-gather")
    ap.add_argument("--clip", action="store_true", help="FC7 clipping: one more scalar all-reduce")
    ap.add_argument("--bandwidth-gbs", type=float, default=25.0, help="per-GPU link bandwidth, GB/s (IB 200G ~ 25)")
    ap.add_argument("--latency-us", type=float, default=8.0, help="latency per message hop, microseconds")
    ap.add_argument("--world-sizes", default="8,16,32,64,128,256,512")
    ap.add_argument("--markdown", action="store_true", help="a markdown table instead of JSON lines")
    ap.add_argument("--check", action="store_true", help="check the model against gloo steps at W = 2, 3")
    ap.add_argument("--check-network", default="mobilefacenet_tiny")
    ap.add_argument("--check-batch", type=int, default=32)
    ap.add_argument("--check-classes", type=int, default=20000)
    ap.add_argument("--check-steps", type=int, default=12)
    args = ap.parse_args(argv)
    if args.check:
        return check(args)
    params = args.params or count_params(args.network)
    link = Link(alpha=args.latency_us * 1e-6, beta=args.bandwidth_gbs * 1e9)
    rows = [step_table(int(w), args, params, link) for w in args.world_sizes.split(",")]
    if not args.markdown:
        for row in rows:
            print(json.dumps({"network": args.network, "params": params, **row}))
        return 0
    print(f"{args.network} ({params / 1e6:.1f} M parameters), {args.batch} per GPU, D = {args.embedding_size}, "
          f"ZeRO-{args.zero}, {args.bandwidth_gbs:g} GB/s and {args.latency_us:g} us per hop\n")
    print("| W | global batch | megaface head ms | megaface backbone ms | arcface_torch head ms | "
          "arcface_torch backbone ms | megaface head MB/rank | arcface_torch head MB/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world_size']} | {r['global_batch']} | {r['megaface_head_ms']} | {r['megaface_backbone_ms']} | "
              f"{r['arcface_torch_head_ms']} | {r['arcface_torch_backbone_ms']} | {r['megaface_head_MB']} | "
              f"{r['arcface_torch_head_MB']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
