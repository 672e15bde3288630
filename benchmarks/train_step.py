"""End-to-end train-step benchmark: loader -> backbone -> head -> both optimizers on N gloo ranks (CPU).

    python benchmarks/train_step.py --networks mobilefacenet,iresnet50 --precisions fp32,bf16 \
        --classes 100000 --sample-rate 0.2 --batch 32 --world-size 2 --warmup 3 --steps 5 \
        --variant before:legacy --variant after: \
        --variant no_overlap:zero_optimization.overlap_comm=false --variant cl:channels_last

All cases run one after another in one set of rank processes (imports and process group paid once;
each case builds its own engine) and each (network, precision, variant) prints one JSON line: samples/s (wall, slowest
rank), samples per CPU-second (summed over ranks: the measure that survives a loaded machine), and each
phase's share of the step, timed exclusively (a collective inside backward counts as communication only):
  data            next(batch) from megaface's TrainLoader over a cached synthetic RecordIO pack (uint8, the
                  training default; its normalisation runs in the step and counts as "other")
  backbone_fwd    the engine's forward
  head_fwd        PartialFC forward: all-gather, sampled FC7 logits + margin, distributed softmax CE
  backward        engine.backward: backbone and head backward (the head's reduce-scatter is communication)
  backbone_step   engine.step: DeepSpeed's optimizer step (and its all-gather of ZeRO partitions)
  fc7_step        step_fc7: the FC7 shard's SGD (+ norm when clipping)
  communication   time inside torch.distributed collectives (synchronous gloo calls; an async call counts
                  its launch only)
  host_sync       the per-step reads of the old step (variant item `legacy`): the loss read on the host and
                  the all-reduced, host-read FC7 gradient norm that step_fc7 computed at every iteration
  other           the rest of the step (lr bookkeeping, Python)
A variant is NAME:ITEMS with comma-separated items: `legacy`, `channels_last` (the model converted: ZeRO
refuses it), `input_channels_last` (the library's model.channels_last: only the batch is NHWC; without it the
batch is fed NCHW), `compile` (model.compile=true: torch.compile of the backbone; give it warm-up steps, the
first ones compile), or a DeepSpeed JSON override
`key.path=value` applied to ds_configs/zero1_<precision>.json (or --ds-config). Data: the images come from
the loader; labels are spread over all classes (label * classes // identities) so positives fall on every
shard. On CPU there is no device queue, so host_sync here is the cost of the work the syncs force (a norm
over the sampled FC7 gradient and a collective), not the GPU pipeline stall they also cause.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "backbone_fwd", "head_fwd", "backward", "backbone_step", "fc7_step", "communication",
          "host_sync", "other")
ITEMS = ("legacy", "channels_last", "input_channels_last", "compile")
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "reduce", "all_to_all_single", "barrier")


class Clock:
    """Exclusive wall and CPU time per phase: entering a nested phase pauses the enclosing one."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []
        self.enabled = True

    def _charge(self, now: tuple[float, float]) -> None:
        name, since = self._stack[-1]
        self.wall[name] += now[0] - since[0]
        self.cpu[name] += now[1] - since[1]

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        now = (time.perf_counter(), time.process_time())
        if self._stack:
            self._charge(now)
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = (time.perf_counter(), time.process_time())
            self._charge(now)
            self._stack.pop()
            if self._stack:
                self._stack[-1][1] = now


_CURRENT: list[Clock] = [Clock()]  # the running case's clock; collectives are patched once per process


def _timed_collectives() -> None:
    """Route torch.distributed's collectives (DeepSpeed's and megaface's alike) through the current clock."""
    if getattr(dist, "_megaface_bench_timed", False):
        return
    dist._megaface_bench_timed = True  # type: ignore[attr-defined]
    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def timed(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
            with _CURRENT[0]("communication"):
                return __original(*args, **kwargs)
        setattr(dist, name, timed)


class _TimedEngine:
    """The DeepSpeed engine with its forward, backward and step timed; everything else passes through."""

    def __init__(self, engine: Any, clock: Clock) -> None:
        self._engine, self._clock = engine, clock

    def __call__(self, *args: Any) -> Any:
        with self._clock("backbone_fwd"):
            return self._engine(*args)

    def backward(self, loss: torch.Tensor) -> Any:
        with self._clock("backward"):
            return self._engine.backward(loss)

    def step(self) -> Any:
        with self._clock("backbone_step"):
            return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _legacy_fc7_norm(parts: Any) -> None:
    """What the old step_fc7 did at every iteration: all-reduce the FC7 squared norm and read it."""
    from megaface.distributed import comm

    grads = [g for g in parts.fc7_optimizer.grads() if g is not None]
    local_sq = torch.zeros((), dtype=torch.float32, device=parts.state.device)
    for g in grads:
        local_sq += g.float().pow(2).sum()
    math.isfinite(float(comm.all_reduce_(local_sq, "sum", parts.state.group)))


def build_parts_for(state: Any, network: str, ds_config: str | Path, overrides: list[str], batch: int,
                    classes: int, sample_rate: float, embedding_size: int | None = 512,
                    channels_last: bool = False, input_channels_last: bool = False,
                    config_overrides: list[str] = ()) -> Any:
    """TrainParts through the library's own build_parts: a DeepSpeed JSON + overrides, a backbone, PartialFC."""
    from megaface.config import load_config, load_ds_config, precision, resolve_ds_config
    from megaface.head import PartialFC
    from megaface.models import build_model
    from megaface.train.build import build_parts

    raw = load_ds_config(ds_config, overrides)
    raw["train_micro_batch_size_per_gpu"] = batch
    ds = resolve_ds_config(raw, state.world_size, state.device.type)
    # the input layout is pinned here (NCHW unless asked), whatever the library's default model.channels_last
    cfg = load_config(None, ["--train.max_steps=1", f"--model.channels_last={str(input_channels_last).lower()}",
                             *config_overrides])
    torch.manual_seed(0)
    model = build_model(network, embedding_size=embedding_size)
    head = PartialFC(model.embedding_size, classes, sample_rate=sample_rate, group=state.group)
    if channels_last:  # an experiment only: DeepSpeed ZeRO refuses NHWC parameters (see benchmarks/README.md)
        model = model.to(memory_format=torch.channels_last)
    return build_parts(cfg, ds, state, model, head, precision(ds))


def build_case(state: Any, case: dict[str, Any], data_root: Path) -> tuple[Any, Any]:
    """(TrainParts, TrainLoader) for one case on this rank."""
    from megaface.data import TrainLoader, build_dataset
    from megaface.data.synthetic import ensure_synthetic

    path = case["ds_config"] or ROOT / "ds_configs" / f"zero1_{case['precision']}.json"
    parts = build_parts_for(state, case["network"], path, [o for o in case["items"] if "=" in o], case["batch"],
                            case["classes"], case["sample_rate"], case["embedding_size"],
                            "channels_last" in case["items"], "input_channels_last" in case["items"],
                            ["--model.compile=true"] if "compile" in case["items"] else [])
    pack_dir, _ = ensure_synthetic(data_root, case["identities"], 4, 0, 0)
    loader = TrainLoader(build_dataset("recordio", str(pack_dir)), case["batch"], state.rank, state.world_size,
                         workers=case["workers"], on_device=True, device=state.device)  # training's input path
    return parts, loader


def _batches(loader: Any, spread: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        for images, labels in loader:
            yield images, labels * spread


def _run_rank(state: Any, case: dict[str, Any], data_root: Path) -> dict[str, Any]:
    import megaface.train.step as step_module

    parts, loader = build_case(state, case, data_root)
    clock = _CURRENT[0] = Clock()
    _timed_collectives()
    parts = dataclasses.replace(parts, engine=_TimedEngine(parts.engine, clock))
    head = parts.head
    legacy = "legacy" in case["items"]

    def timed_head(*args: Any) -> torch.Tensor:
        with clock("head_fwd"):
            return head(*args)

    original_fc7 = step_module.step_fc7

    def timed_fc7(*args: Any) -> bool:
        if legacy:
            with clock("host_sync"):
                _legacy_fc7_norm(parts)
        with clock("fc7_step"):
            return original_fc7(*args)

    parts = dataclasses.replace(parts, head=timed_head)
    step_module.step_fc7 = timed_fc7
    try:
        return _measure(parts, loader, case, clock, legacy, step_module.train_step)
    finally:
        step_module.step_fc7 = original_fc7


def _measure(parts: Any, loader: Any, case: dict[str, Any], clock: Clock, legacy: bool,
             train_step: Any) -> dict[str, Any]:
    batches = _batches(loader, max(case["classes"] // case["identities"], 1))
    losses = []
    for step in range(case["warmup"] + case["steps"]):
        if step == case["warmup"]:
            dist.barrier()
            clock.wall.clear(), clock.cpu.clear()
            started = (time.perf_counter(), time.process_time())
        with clock("other"):
            with clock("data"):
                images, labels = next(batches)
            loss = train_step(parts, images, labels)
            if legacy:
                with clock("host_sync"):
                    losses.append(float(loss))  # the old step read every loss on the host
            else:
                losses.append(loss)
    dist.barrier()
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    losses = [float(x) for x in losses]
    return {"wall": wall, "cpu": cpu, "phase_wall": dict(clock.wall), "phase_cpu": dict(clock.cpu),
            "loss_finite": all(math.isfinite(x) for x in losses), "last_loss": losses[-1]}


def _rank_main(rank: int, world: int, port: int, threads: int, items: list[Any], run_item: Callable[[Any, Any], dict],
               queue: Any) -> None:
    """One rank: every item in one process group, so the (slow, on a loaded machine) imports and group set-up
    are paid once; each item's result (or its error) goes to the parent."""
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megaface.distributed import init_distributed, shutdown

    state = init_distributed(backend="gloo", timeout_s=3600)
    try:
        for index, item in enumerate(items):
            try:
                queue.put((index, rank, run_item(state, item)))
            except Exception as err:  # reported by the parent, which names the item
                queue.put((index, rank, {"error": f"{type(err).__name__}: {err}"}))
                raise
    finally:
        shutdown()


def run_on_ranks(items: list[Any], world: int, threads: int, run_item: Callable[[Any, Any], dict]
                 ) -> Iterator[tuple[Any, list[dict[str, Any]] | None, str | None]]:
    """Spawn `world` gloo ranks that run `run_item(state, item)` for every item in order (run_item must be a
    module-level function or a partial of one); yields (item, per-rank results, None) as soon as every rank
    reports an item, or (item, None, first error) and stops."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, threads, items, run_item, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for index, item in enumerate(items):
        while len(results[index]) < world:
            got_index, rank, result = queue.get()
            results[got_index][rank] = result
        errors = [r["error"] for r in results[index].values() if "error" in r]
        yield item, (None if errors else [results[index][r] for r in range(world)]), errors[0] if errors else None
        if errors:
            break
    for p in procs:
        p.join()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cases(cases: list[dict[str, Any]], data_root: str) -> Iterator[dict[str, Any]]:
    """One JSON-able summary per case, in order, as soon as both ranks report it."""
    run_item = functools.partial(_run_rank, data_root=Path(data_root))
    for case, ranks, error in run_on_ranks(cases, cases[0]["world_size"], cases[0]["threads"], run_item):
        yield {**_label(case), "error": error} if error else _summary(case, ranks)


def _label(case: dict[str, Any]) -> dict[str, Any]:
    return {k: case[k] for k in ("network", "precision", "variant", "items", "classes", "sample_rate", "batch",
                                 "world_size", "steps")}


def _summary(case: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    samples = case["batch"] * case["world_size"] * case["steps"]
    wall = max(r["wall"] for r in ranks)
    cpu = sum(r["cpu"] for r in ranks)
    shares = {}
    for kind in ("wall", "cpu"):
        totals = {p: sum(r[f"phase_{kind}"].get(p, 0.0) for r in ranks) for p in PHASES}
        whole = sum(totals.values()) or 1.0
        shares[kind] = {p: round(v / whole, 4) for p, v in totals.items()}
    return {**_label(case), "samples_per_s": round(samples / wall, 3),
            "samples_per_cpu_s": round(samples / cpu, 3), "step_s": round(wall / case["steps"], 4),
            "phase_share_wall": shares["wall"], "phase_share_cpu": shares["cpu"],
            "loss_finite": all(r["loss_finite"] for r in ranks), "last_loss": round(ranks[0]["last_loss"], 4)}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="mobilefacenet,iresnet50")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--variant", action="append", default=None,
                        help=f"NAME:ITEMS (items: {', '.join(ITEMS)}, ds.key=value); default before:legacy, after:")
    parser.add_argument("--ds-config", default=None, help="base JSON (default ds_configs/zero1_<precision>.json)")
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--sample-rate", type=float, default=0.2)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="images per rank")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes per rank")
    parser.add_argument("--identities", type=int, default=64, help="synthetic identities in the cached pack")
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "megaface_bench_data"))
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    variants = args.variant or ["before:legacy", "after:"]
    cases = []
    for network in args.networks.split(","):
        for prec in args.precisions.split(","):
            for text in variants:
                name, _, items = text.partition(":")
                unknown = [i for i in items.split(",") if i and "=" not in i and i not in ITEMS]
                if unknown:
                    raise SystemExit(f"--variant {text}: unknown item(s) {unknown}; choose from {ITEMS} or key=value")
                cases.append({"network": network, "precision": prec, "variant": name,
                              "items": [i for i in items.split(",") if i], "ds_config": args.ds_config,
                              "classes": args.classes, "sample_rate": args.sample_rate, "batch": args.batch,
                              "embedding_size": args.embedding_size, "world_size": args.world_size,
                              "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
                              "workers": args.workers, "identities": args.identities})
    for summary in run_cases(cases, args.data_root):
        line = json.dumps(summary)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as file:
                file.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
