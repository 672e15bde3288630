"""Everything before the first step: process group, DeepSpeed JSON check, data, model, head, engine.

Why the FC7 shard stays outside the engine: every rank holds different classifier rows whose gradients are
already complete (each rank saw the whole global batch through the all-gather), so they must be neither
averaged across ranks nor partitioned by ZeRO. DeepSpeed therefore only sees the backbone; the shard gets
`megaface.head.ShardSGD`. With head.parallel = "data" the replicated FC7 goes into the engine with the
backbone (a `DataParallelFace` container) and DeepSpeed averages its gradients like the backbone's.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from megaface.config import ExperimentConfig, check_optimizer_single_source, resolve_ds_config, zero_stage
from megaface.config import precision as ds_precision
from megaface.distributed import DistState, comm
from megaface.distributed.ds_shm import skip_shm_build
from megaface.head import PartialFC
from megaface.head.optim import ShardOptimizer
from megaface.train.optim import backbone_optimizer
from megaface.train.optim import fc7_optimizer as build_fc7_optimizer
from megaface.train.schedule import resolve_milestones, resolve_warmup


class DataParallelFace(nn.Module):
    """Backbone + replicated FC7 in one module, so DeepSpeed averages the FC7 gradients too."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


@dataclass
class TrainParts:
    """What the train step needs. `fc7_optimizer` is None when the head lives inside the engine."""

    engine: Any
    head: PartialFC
    fc7_optimizer: ShardOptimizer | None
    backbone: nn.Module
    state: DistState
    clip: float
    precision: str
    input_dtype: torch.dtype
    input_format: torch.memory_format = torch.contiguous_format
    normalize: str = "arcface_torch"
    """Pixel normalisation of a RawBatch prepared on the device (data.normalize)."""


def build_parts(cfg: ExperimentConfig, ds: dict[str, Any], state: DistState, backbone: nn.Module,
                head: PartialFC, precision: str) -> TrainParts:
    """deepspeed.initialize for the backbone (+ data-parallel head); ShardSGD / ShardAdamW for a model-parallel
    head. Both optimizers come from the experiment's optim section (`megaface.train.optim`).

    The backbone's parameters stay NCHW (contiguous): DeepSpeed ZeRO views parameters as flat bytes and
    refuses NHWC strides, and converting after deepspeed.initialize would break ZeRO's flat-buffer aliasing.
    Only the input batch goes channels_last (`model.channels_last`): the convolutions then run in NHWC, which
    gave the same ~22% MobileFaceNet speed-up as converting the whole model (benchmarks/README.md), and
    autograd returns each weight gradient in its parameter's (contiguous) layout."""
    import deepspeed

    if state.device.type == "cpu":
        skip_shm_build()  # no C++ compiler needed (megaface.distributed.ds_shm)
    module: nn.Module = DataParallelFace(backbone, head) if cfg.head.parallel == "data" else backbone
    # Built here (not from the JSON) so that one schedule drives both optimizers; DeepSpeed wraps it.
    optimizer = backbone_optimizer(module.parameters(), cfg.optim)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds,
                                           dist_init_required=False)
    if cfg.model.compile:
        check_compile(zero_stage(ds), state.device)
        engine.compile()  # compiles engine.module in place: state_dict keys, checkpoints and validation unchanged
    fc7_optimizer = None
    if cfg.head.parallel == "model":
        head.to(state.device)
        fc7_optimizer = build_fc7_optimizer(head, cfg.optim, cfg.head.lr_scale, cfg.head.momentum_dtype)
    input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if input_dtype != torch.float32:
        # DeepSpeed casts parameters but not buffers; BatchNorm refuses bf16 weights with fp32 running stats
        for buffer in engine.module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(input_dtype)
    live_head = engine.module.head if cfg.head.parallel == "data" else head
    live_backbone = engine.module.backbone if cfg.head.parallel == "data" else engine.module
    return TrainParts(engine, live_head, fc7_optimizer, live_backbone, state,
                      fc7_max_norm(cfg.head.clip_grad_norm, ds), precision, input_dtype,
                      torch.channels_last if cfg.model.channels_last else torch.contiguous_format, cfg.data.normalize)


def check_compile(stage: int, device: torch.device) -> None:
    """model.compile=true needs ZeRO 0-2 and, on CPU, a C++ compiler for inductor's generated code."""
    import shutil

    if stage == 3:
        raise ValueError("model.compile=true is supported with ZeRO stages 0-2 (the DeepSpeed JSON has stage 3): "
                         "use a stage 0-2 JSON or set model.compile=false")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++")
                                        if c):
        raise ValueError("model.compile=true on CPU needs a C++ compiler (torch.compile's inductor writes C++): "
                         "install one (apt-get install g++) or set model.compile=false")


def cpu_has_bf16_units(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (x86 AVX512-BF16 or AMX; Arm BF16)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read(1 << 20)
        except OSError:  # not Linux: no way to tell, so keep what the JSON asks for
            return True
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return True


def auto_head_dtype(compute_dtype: str, precision: str, device: torch.device,
                    log: Callable[[str], Any] = print, cpuinfo: str | None = None) -> str:
    """head.compute_dtype=auto on a CPU without bf16 units under a bf16 JSON -> fp32, said in one line.

    There bf16 matrix products are emulated and about 3x slower than fp32 (benchmarks/README.md), while the
    head's statistics, margin and loss are fp32 either way; everywhere else auto follows the JSON."""
    if compute_dtype == "auto" and precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_units(cpuinfo):
        log("head: compute_dtype auto -> fp32 (this CPU has no bf16 matrix units: no avx512_bf16/amx_bf16 "
            "flag; set head.compute_dtype=bf16 to force bf16)")
        return "fp32"
    return compute_dtype


def fc7_max_norm(clip_grad_norm: float | None, ds: dict[str, Any]) -> float:
    """FC7's max gradient norm: head.clip_grad_norm, or the JSON's gradient_clipping when it is None; 0 = off."""
    if clip_grad_norm is None:
        return float(ds.get("gradient_clipping", 0.0))
    return float(clip_grad_norm)


@dataclass
class Run:
    """The assembled job: parts for the step, the loader, counters and what checkpoints record."""

    cfg: ExperimentConfig
    ds: dict[str, Any]
    state: DistState
    parts: TrainParts
    loader: Any
    validator: Any
    output_dir: Path
    total_steps: int
    milestones: list[int]
    warmup_steps: int
    gas: int
    num_classes: int
    network: str
    embedding_size: int
    start_iteration: int = 0
    skipped_steps: int = 0
    resumed_from: Path | None = None
    notes: list[str] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        from megaface.head.sharding import class_range

        w = self.state.world_size
        ranges = ([list(class_range(self.num_classes, w, r)) for r in range(w)]
                  if self.cfg.head.parallel == "model" else [[0, self.num_classes]])
        return {"network": self.network, "embedding_size": self.embedding_size, "num_classes": self.num_classes,
                "world_size": w, "class_ranges": ranges, "zero_stage": zero_stage(self.ds),
                "precision": self.parts.precision, "parallel": self.cfg.head.parallel,
                "normalize": self.cfg.data.normalize, "config": self.cfg.to_dict(), "ds_config": self.ds,
                "subcenters": self.cfg.head.subcenters}

    def expected(self) -> dict[str, Any]:
        return {"network": self.network, "embedding_size": self.embedding_size, "num_classes": self.num_classes,
                "parallel": self.cfg.head.parallel}


def init_process_group(timeout_s: float) -> DistState:
    """Join the launcher's job; a single process gets a 1-rank group so that DeepSpeed runs no discovery
    of its own (its MPI discovery would take MASTER_ADDR from the external interface)."""
    from megaface.distributed import init_distributed

    try:
        return init_distributed(timeout_s=timeout_s, require_group=True)
    except torch.distributed.DistNetworkError as err:
        if "EADDRINUSE" not in str(err) and "already in use" not in str(err):
            raise
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        raise ValueError(f"MASTER_PORT={port} on MASTER_ADDR={addr} is already in use (another job or an earlier "
                         "run still listening): export another MASTER_PORT, or unset MASTER_ADDR/MASTER_PORT for "
                         "a single process (megaface then picks a free port)") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _training_data(cfg: ExperimentConfig, state: DistState, log: Any) -> tuple[Any, list[str]]:
    """(dataset, extra validation bins). Synthetic packs are written by rank 0 while the others wait."""
    from megaface.data import build_dataset

    d = cfg.data
    if d.source == "ofrecord":  # each rank indexes its share of the parts; the offset tables are exchanged
        return build_dataset("ofrecord", d.path, num_classes=cfg.head.num_classes, part_num=d.part_num,
                             part_name_suffix_length=d.part_name_suffix_length,
                             share=(state.rank, state.world_size),
                             gather=lambda obj: comm.all_gather_object(obj, state.group)), []
    if d.source != "synthetic":
        return build_dataset(d.source, d.path), []
    from megaface.data.synthetic import ensure_synthetic

    s = d.synthetic
    args = (Path(d.cache_dir).expanduser(), s.identities, s.images_per_identity, s.val_pairs, s.seed)
    if state.is_main:
        log(f"data: synthetic identities {s.identities} x {s.images_per_identity} images (cache {args[0]})")
        ensure_synthetic(*args)
    comm.barrier(state.group)
    pack_dir, bin_path = ensure_synthetic(*args)  # cached now: returns the paths only
    bins = [str(bin_path)] if cfg.validation.synthetic and s.val_pairs > 0 else []
    return build_dataset("recordio", str(pack_dir)), bins


def sample_rate_of(sample_rate: float, num_sample: int | None, num_classes: int) -> float:
    """head.sample_rate, or the seed's head.num_sample (classes per step over all ranks) as a rate."""
    if num_sample is None:
        return float(sample_rate)
    if num_sample > num_classes:
        raise ValueError(f"head.num_sample={num_sample} exceeds the {num_classes} classes of the training data; "
                         f"use at most {num_classes} (or drop it to train every class)")
    return num_sample / num_classes


def load_initial_weights(model: nn.Module, path: str, network: str) -> None:
    """model.init_from: a backbone file's or a checkpoint's weights (sha256 digests verified first), strictly
    (every key and shape must fit `network`)."""
    from megaface.checkpoint import checkpoint_backbone_state, read_backbone_file, read_meta, resolve_network
    from megaface.checkpoint.integrity import open_checkpoint

    if Path(path).is_dir():
        tag_dir = open_checkpoint(path)
        state, meta = checkpoint_backbone_state(tag_dir), read_meta(tag_dir)
    else:
        state, meta = read_backbone_file(path)
    resolve_network(meta, network, path)  # a file that names another network is refused with the fix
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"model.init_from={path}: the weights do not fit model.network={network} "
                         f"(embedding_size={getattr(model, 'embedding_size', '?')}): {str(err)[:300]}") from None


def build_margin(h: Any) -> Any:
    """The head's margin object from the `head` config section (its gradient mode and fallback included)."""
    from megaface.head import AdaFaceMargin, CombinedMargin

    if h.margin == "adaface":
        a = h.adaface
        return AdaFaceMargin(a.m, a.h, a.t_alpha, h.straight_through)
    return CombinedMargin(h.margin, h.straight_through, h.margin_fallback)


def build_run(cfg: ExperimentConfig, ds_raw: dict[str, Any], state: DistState, log: Any) -> Run:
    ds = resolve_ds_config(check_optimizer_single_source(cfg, ds_raw), state.world_size, state.device.type)
    precision = ds_precision(ds)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    dataset, extra_bins = _training_data(cfg, state, log)
    num_classes = int(dataset.num_classes)
    if cfg.head.num_classes is not None and cfg.head.num_classes != num_classes:
        raise ValueError(f"head.num_classes={cfg.head.num_classes} but the training data has {num_classes} "
                         "classes: fix head.num_classes (or drop it to take the data's count)")
    bins = list(cfg.validation.bins) + extra_bins
    validator = None
    if cfg.validation.interval > 0 and bins:
        from megaface.eval.validation import Validator

        # built (and each pack checked) before the model: a bad pack fails now, not hours in
        validator = Validator(bins, state, batch_size=cfg.validation.batch_size, normalize=cfg.data.normalize)
    from megaface.data import TrainLoader
    from megaface.head import resolve_compute_dtype
    from megaface.models import build_model

    micro, gas = int(ds["train_micro_batch_size_per_gpu"]), int(ds["gradient_accumulation_steps"])
    head_dtype = auto_head_dtype(cfg.head.compute_dtype, precision, state.device, log)
    # data.prepare=device: uint8 batches to the device, one batch ahead; flip, augmentations and normalisation
    # run there. host: float32 batches normalised in this process (the former path)
    loader = TrainLoader(dataset, micro, state.rank, state.world_size, seed=cfg.data.seed,
                         workers=cfg.data.workers, flip=cfg.data.flip, normalize=cfg.data.normalize,
                         skip_corrupt=cfg.data.skip_corrupt, strict_decode=cfg.data.strict_decode,
                         on_device=cfg.data.prepare == "device",
                         augment=cfg.data.augment, decode=cfg.data.decode,
                         pin_memory=state.device.type == "cuda", device=state.device)
    model = build_model(cfg.model.network, embedding_size=cfg.model.embedding_size, dropout=cfg.model.dropout,
                        **cfg.model.build_options())
    if cfg.model.init != "per_group":
        from megaface.models.layers import init_conv_weights

        init_conv_weights(model, per_group=False)  # re-drawn from the seeded global generator
    if cfg.model.init_from:
        load_initial_weights(model, cfg.model.init_from, cfg.model.network)
        log(f"model: starting from the weights in {cfg.model.init_from}")
    h = cfg.head
    head = PartialFC(model.embedding_size, num_classes, margin=build_margin(h), scale=h.scale,
                     sample_rate=sample_rate_of(h.sample_rate, h.num_sample, num_classes),
                     group=state.group, parallel=h.parallel,
                     seed=cfg.train.seed, compute_dtype=resolve_compute_dtype(head_dtype, precision),
                     interclass_filtering_threshold=h.interclass_filtering_threshold,
                     accumulation_steps=gas, init_std=h.init_std, subcenters=h.subcenters,
                     weight_dtype=h.weight_dtype)
    parts = build_parts(cfg, ds, state, model, head, precision)
    per_epoch = max(len(loader) // gas, 1)
    if cfg.train.max_steps is not None:
        total = cfg.train.max_steps
    else:
        assert cfg.train.epochs is not None  # the loader requires exactly one of max_steps and epochs
        total = max(int(math.ceil(cfg.train.epochs * per_epoch)), 1)
    return Run(cfg, ds, state, parts, loader, validator, Path(cfg.train.output_dir), total,
               resolve_milestones(cfg.optim, per_epoch),
               resolve_warmup(cfg.optim.warmup_steps, cfg.optim.warmup_epochs, per_epoch), gas, num_classes,
               model.network_name, model.embedding_size)
