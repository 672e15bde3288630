"""Side by side on N gloo CPU ranks, fp32: arcface_torch's training step (driven as train_v2.py does) vs megaface's.

    nice -n 5 python benchmarks/peer_step.py --arcface-torch /tmp/insightface/recognition/arcface_torch \
        --networks mobilefacenet,mobilefacenet_wide,iresnet50 --classes 100000 --sample-rate 0.2 --batch 32 \
        --world-size 2 --warmup 2 --steps 4

--arcface-torch is InsightFace's recognition/arcface_torch folder (e.g. exported with
`git archive HEAD recognition/arcface_torch | tar -x -C /tmp/insightface`); its modules are imported at run time
(backbones.get_model, losses.CombinedMarginLoss, partial_fc_v2.PartialFC_V2, lr_scheduler.PolynomialLRWarmup),
never copied. Trainers, all built once per network in one pair of rank processes and run alternately, step by
step (the order rotates every step), so a change in the machine's load hits all of them:
  megaface     megaface's train_step over the DeepSpeed engine of benchmarks/train_step.py (build_parts_for:
               ds_configs/zero1_fp32.json + --megaface-override, by default gradient_clipping=5.0 to match the
               peer's clip of the backbone; megaface then also clips FC7 by its global norm)
  megaface_cl  the same engine and head, with only the input batch in channels_last (weights stay NCHW, so
               DeepSpeed's flat buffers are unaffected): what megaface's train step does by default
               (model.channels_last: true); `megaface` is fed NCHW (model.channels_last: false)
  peer         the step of train_v2.py: DDP over the backbone (bucket_cap_mb=16, find_unused_parameters,
               static graph, fp16_compress_hook), PartialFC_V2 with CombinedMarginLoss(64, 1.0, 0.5, 0.0) (ArcFace),
               one SGD over backbone + FC7 (lr 0.1, momentum 0.9, wd 5e-4), loss.backward(),
               clip_grad_norm_(backbone, 5), step, zero_grad, PolynomialLRWarmup.step(), loss.item()
Run-time patches for CPU (their files are not edited): torch.Tensor.cuda is the identity while the peer step
runs (PartialFC_V2 moves the tensors it makes with .cuda()); LRScheduler.__init__ drops the `verbose` argument
PolynomialLRWarmup passes while it is built (this torch removed it); DDP gets no device_ids (CPU modules); their
torch.cuda.amp.autocast(False) blocks run as they are (disabled autocast is a no-op on CPU).
Inputs: the same random images [batch, 3, 112, 112] and labels over all classes for every trainer (a pool of
batches per rank, seeded by rank). Per trainer: samples/s (sum of per-step walls, each step fenced by barriers,
so the slowest rank's) and samples per CPU-second (process CPU time summed over ranks, the measure that survives
a shared machine); ratios megaface/peer. Before the ranks start, a 1-thread, no-DDP forward+backward of each
project's backbone on one batch (CPU time) separates backbone implementation from loop/engine/head overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_step import build_parts_for, run_on_ranks  # noqa: E402  (the megaface side is train_step.py's)

# megaface name -> arcface_torch's same network (docs/insightface_mapping.md): its get_model("mbf") is megaface's
# mobilefacenet_wide (scale=2); megaface's mobilefacenet is its MobileFaceNet class at scale=1, no get_model name
PEER_NAMES = {"mobilefacenet": "MobileFaceNet(blocks=(1, 4, 6, 2), scale=1)", "mobilefacenet_wide": "mbf",
              "iresnet50": "r50"}
PEER_FILES = ("backbones/__init__.py", "losses.py", "partial_fc_v2.py", "lr_scheduler.py")
TRAINERS = ("megaface", "megaface_cl", "peer")
RATIOS = (("megaface", "peer"), ("megaface_cl", "peer"))


def check_arcface_torch(path: str | None) -> Path:
    """The arcface_torch folder, or a ValueError naming the flag, the folder it expects and what is missing."""
    if not path:
        raise ValueError("--arcface-torch DIR is required for the peer trainer: DIR is InsightFace's "
                         "recognition/arcface_torch folder (or leave the peer out with --trainers megaface,...)")
    root = Path(path).expanduser().resolve()
    missing = [name for name in PEER_FILES if not (root / name).is_file()]
    if missing:
        raise ValueError(f"--arcface-torch {path}: expected InsightFace's recognition/arcface_torch folder "
                         f"(holding {', '.join(PEER_FILES)}), but {', '.join(missing)} not found there; export "
                         "it with `git archive HEAD recognition/arcface_torch | tar -x -C DEST` from an InsightFace "
                         "clone and pass DEST/recognition/arcface_torch")
    return root


def import_peer(root: Path) -> dict[str, Any]:
    """arcface_torch's modules, imported from `root` (they import each other as top-level names)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return {name: importlib.import_module(name) for name in ("backbones", "losses", "partial_fc_v2",
                                                             "lr_scheduler")}


@contextlib.contextmanager
def cuda_as_identity() -> Iterator[None]:
    """Tensor.cuda() returns the tensor itself: PartialFC_V2 calls it on what it builds, and this is CPU."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


@contextlib.contextmanager
def scheduler_without_verbose() -> Iterator[None]:
    """LRScheduler.__init__ accepts and drops `verbose`, which PolynomialLRWarmup passes and this torch removed."""
    base = torch.optim.lr_scheduler.LRScheduler
    original = base.__init__

    def init(self: Any, optimizer: torch.optim.Optimizer, last_epoch: int = -1, verbose: Any = None) -> None:
        original(self, optimizer, last_epoch)
    base.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        base.__init__ = original  # type: ignore[method-assign]


def build_peer_backbone(peer: dict[str, Any], network: str, embedding_size: int) -> torch.nn.Module:
    if network == "mobilefacenet":
        mobilefacenet = importlib.import_module("backbones.mobilefacenet")
        return mobilefacenet.MobileFaceNet(fp16=False, num_features=embedding_size, blocks=(1, 4, 6, 2), scale=1)
    return peer["backbones"].get_model(PEER_NAMES[network], dropout=0.0, fp16=False, num_features=embedding_size)


def build_train_v2(peer: dict[str, Any], network: str, embedding_size: int, num_classes: int,
                   sample_rate: float, *, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                   warmup: int = 2, total: int = 10_000, margin: tuple[float, float, float] = (1.0, 0.5, 0.0),
                   scale: float = 64, seed: int = 0) -> tuple[Any, Any, Any, Any, Callable[..., float]]:
    """train_v2.py's objects for this rank (CPU/gloo, after init_process_group) and its fp32 iteration:
    (backbone DDP, PartialFC_V2, SGD, PolynomialLRWarmup, step(images, labels) -> the host loss as its loop
    logs it). The one builder of the peer trainer: this benchmark and tests/support/arcface_torch_fixtures.py."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    torch.manual_seed(seed)  # every rank builds the same backbone; PartialFC_V2 draws its own shard
    backbone = torch.nn.parallel.DistributedDataParallel(
        build_peer_backbone(peer, network, embedding_size), broadcast_buffers=False, bucket_cap_mb=16,
        find_unused_parameters=True)
    backbone.register_comm_hook(None, fp16_compress_hook)
    backbone.train()
    backbone._set_static_graph()
    margin_loss = peer["losses"].CombinedMarginLoss(scale, *margin, 0)
    head = peer["partial_fc_v2"].PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, False).train()
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=lr,
                          momentum=momentum, weight_decay=weight_decay)
    with scheduler_without_verbose(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = peer["lr_scheduler"].PolynomialLRWarmup(opt, warmup_iters=warmup, total_iters=total)

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        with cuda_as_identity(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.cuda.amp.autocast's deprecation / no-CUDA notices
            loss = head(backbone(images), labels.clone())  # clone: PartialFC_V2 squeezes its labels in place
            loss.backward()
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
            opt.step()
            opt.zero_grad()
            scheduler.step()
            return loss.item()
    return backbone, head, opt, scheduler, step


def build_megaface(state: Any, network: str, case: dict[str, Any]) -> Callable[..., float]:
    """megaface's train_step over train_step.py's engine; `channels_last` converts only the input batch."""
    from megaface.train.step import train_step

    ds_config = case["megaface_ds"] or ROOT / "ds_configs" / "zero1_fp32.json"
    parts = build_parts_for(state, network, ds_config, case["megaface_overrides"], case["batch"], case["classes"],
                            case["sample_rate"], case["embedding_size"])

    def step(images: torch.Tensor, labels: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return train_step(parts, images, labels)
    return step


def _fenced(step: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) of one step between barriers: the wall is the slowest rank's."""
    dist.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    dist.barrier()
    return time.perf_counter() - wall, time.process_time() - cpu


def _run_network(state: Any, network: str, case: dict[str, Any]) -> dict[str, Any]:
    trainers: dict[str, Callable[..., Any]] = {}
    if "megaface" in case["trainers"] or "megaface_cl" in case["trainers"]:
        megaface = build_megaface(state, network, case)
        trainers["megaface"] = megaface
        trainers["megaface_cl"] = lambda images, labels: megaface(images, labels, channels_last=True)
    if "peer" in case["trainers"]:
        trainers["peer"] = build_train_v2(import_peer(Path(case["arcface_torch"])), network, case["embedding_size"],
                                          case["classes"], case["sample_rate"])[-1]
    names = [n for n in TRAINERS if n in case["trainers"]]
    gen = torch.Generator().manual_seed(1000 + state.rank)
    pool = [(torch.randn(case["batch"], 3, 112, 112, generator=gen),
             torch.randint(0, case["classes"], (case["batch"],), generator=gen)) for _ in range(2)]
    totals = {n: {"wall": 0.0, "cpu": 0.0} for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    for step in range(case["warmup"] + case["steps"]):
        images, labels = pool[step % len(pool)]
        for name in names[step % len(names):] + names[:step % len(names)]:  # rotate who goes first
            out: list[Any] = []
            wall, cpu = _fenced(lambda out=out, name=name, images=images, labels=labels: out.append(trainers[name](images, labels)))
            losses[name].append(float(out[0]))
            if step >= case["warmup"]:
                totals[name]["wall"] += wall
                totals[name]["cpu"] += cpu
    return {"totals": totals, "last_loss": {n: losses[n][-1] for n in names}}


def _run_network_quiet(state: Any, network: str, case: dict[str, Any]) -> dict[str, Any]:
    """`_run_network` with the peer's per-step deprecation warnings silenced (run on each rank)."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations in torch's DDP/c10d, every step
    warnings.filterwarnings("ignore", message=".*find_unused_parameters=true.*")  # train_v2 sets both
    return _run_network(state, network, case)


def summarize(network: str, case: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One network's line: per trainer samples/s (slowest rank) and samples per CPU-second (ranks summed)."""
    samples = case["batch"] * case["world_size"] * case["steps"]
    out: dict[str, Any] = {}
    for name in ranks[0]["totals"]:
        wall = max(r["totals"][name]["wall"] for r in ranks)
        cpu = sum(r["totals"][name]["cpu"] for r in ranks)
        out[name] = {"samples_per_s": round(samples / wall, 3), "samples_per_cpu_s": round(samples / cpu, 3),
                     "step_s": round(wall / case["steps"], 4), "last_loss": round(ranks[0]["last_loss"][name], 4)}
    ratios = {f"{a}/{b}": {"wall": round(out[a]["samples_per_s"] / out[b]["samples_per_s"], 3),
                           "cpu": round(out[a]["samples_per_cpu_s"] / out[b]["samples_per_cpu_s"], 3)}
              for a, b in RATIOS if a in out and b in out}
    return {"network": network, "peer_network": PEER_NAMES[network], "classes": case["classes"], "sample_rate": case["sample_rate"],
            "batch": case["batch"], "world_size": case["world_size"], "steps": case["steps"],
            "trainers": out, "ratio": ratios}


def run_ranks(case: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One summary per network, as soon as every rank reports it."""
    run_item = functools.partial(_run_network_quiet, case=case)
    for network, ranks, error in run_on_ranks(case["networks"], case["world_size"], case["threads"], run_item):
        yield {"network": network, "error": error} if error else summarize(network, case, ranks)


def backbone_cpu(case: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Per network, 1 thread, no DDP: CPU ms of one forward+backward on the same batch, each variant alternately."""
    from megaface.models import build_model

    torch.set_num_threads(1)
    peer = import_peer(Path(case["arcface_torch"])) if "peer" in case["trainers"] else None
    images = torch.randn(case["batch"], 3, 112, 112, generator=torch.Generator().manual_seed(0))
    for network in case["networks"]:
        torch.manual_seed(0)
        models = {"megaface": build_model(network, embedding_size=case["embedding_size"]).train()}
        inputs = {"megaface": images, "megaface_cl": images.contiguous(memory_format=torch.channels_last)}
        models["megaface_cl"] = models["megaface"]
        if peer is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                models["peer"] = build_peer_backbone(peer, network, case["embedding_size"]).train()
            inputs["peer"] = images
        cpu = {name: 0.0 for name in models}
        for rep in range(1 + case["backbone_reps"]):
            for name, model in models.items():
                started = time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model(inputs[name]).square().mean().backward()
                model.zero_grad(set_to_none=True)
                if rep:  # the first round warms up
                    cpu[name] += time.process_time() - started
        ms = {n: round(1000 * v / case["backbone_reps"], 1) for n, v in cpu.items()}
        params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items() if n != "megaface_cl"}
        yield {"network": network, "peer_network": PEER_NAMES[network], "backbone_fwd_bwd_cpu_ms": ms, "parameters": params, "threads": 1,
               "batch": case["batch"],
               "ratio": {f"{a}/{b}": round(ms[b] / ms[a], 3) for a, b in RATIOS if a in ms and b in ms}}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arcface-torch", default=None, help="InsightFace's recognition/arcface_torch folder")
    parser.add_argument("--networks", default="mobilefacenet,iresnet50", help=f"of {', '.join(PEER_NAMES)} (each against arcface_torch's same network)")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help=f"of {', '.join(TRAINERS)}")
    parser.add_argument("--megaface-ds", default=None, help="megaface's DeepSpeed JSON (default zero1_fp32.json)")
    parser.add_argument("--megaface-override", action="append", default=None,
                        help="key.path=value on that JSON (default gradient_clipping=5.0, the peer's clip)")
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--sample-rate", type=float, default=0.2)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="images per rank")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--backbone-reps", type=int, default=2, help="1-thread fwd+bwd repeats (0: skip)")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.trainers = [t for t in args.trainers.split(",") if t]
    args.networks = [n for n in args.networks.split(",") if n]
    unknown = [t for t in args.trainers if t not in TRAINERS] + [n for n in args.networks if n not in PEER_NAMES]
    if unknown:
        parser.error(f"unknown trainer/network {', '.join(unknown)}: trainers are {', '.join(TRAINERS)}, "
                     f"networks {', '.join(PEER_NAMES)}")
    if "peer" in args.trainers:
        try:
            args.arcface_torch = str(check_arcface_torch(args.arcface_torch))
        except ValueError as err:
            parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    case = {**vars(args), "megaface_overrides": args.megaface_override or ["gradient_clipping=5.0"]}
    summary: dict[str, Any] = {"summary": True, "backbone_cpu_ratio": {}, "step_ratio": {}}

    def emit(line: dict[str, Any]) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as file:
                file.write(text + "\n")

    if args.backbone_reps > 0:
        for line in backbone_cpu(case):
            summary["backbone_cpu_ratio"][line["network"]] = line["ratio"]
            emit(line)
    for line in run_ranks(case):
        emit(line)
        if "error" in line:
            return 1
        summary["step_ratio"][line["network"]] = line["ratio"]
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
