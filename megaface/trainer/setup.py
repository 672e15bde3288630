"""Everything before the first step: process group, DeepSpeed JSON check, data, model, head, engine, resume."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megaface.config import ExperimentConfig
from megaface.dist import DistState, comm
from megaface.ds_config import precision as ds_precision
from megaface.ds_config import resolve_ds_config, zero_stage
from megaface.engine import TrainParts, build_parts, resolve_milestones


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
                "normalize": self.cfg.data.normalize, "config": self.cfg.to_dict(), "ds_config": self.ds}

    def expected(self) -> dict[str, Any]:
        return {"network": self.network, "embedding_size": self.embedding_size, "num_classes": self.num_classes,
                "parallel": self.cfg.head.parallel}


def init_process_group(timeout_s: float) -> DistState:
    """Join the launcher's job; a single process gets a 1-rank group so that DeepSpeed runs no discovery
    of its own (its MPI discovery would take MASTER_ADDR from the external interface)."""
    from megaface.dist import init_distributed

    return init_distributed(timeout_s=timeout_s, require_group=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _training_data(cfg: ExperimentConfig, state: DistState, log: Any) -> tuple[Any, list[str]]:
    """(dataset, extra validation bins). Synthetic packs are written by rank 0 while the others wait."""
    from megaface.data import build_dataset

    d = cfg.data
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


def build_run(cfg: ExperimentConfig, ds_raw: dict[str, Any], state: DistState, log: Any) -> Run:
    ds = resolve_ds_config(ds_raw, state.world_size, state.device.type)
    precision = ds_precision(ds)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    dataset, extra_bins = _training_data(cfg, state, log)
    num_classes = int(dataset.num_classes)
    if cfg.head.num_classes is not None and cfg.head.num_classes != num_classes:
        raise ValueError(f"head.num_classes={cfg.head.num_classes} but the training data has {num_classes} "
                         "classes: fix head.num_classes (or drop it to take the data's count)")
    from megaface.data import TrainLoader
    from megaface.head import PartialFC
    from megaface.models import build_model

    micro, gas = int(ds["train_micro_batch_size_per_gpu"]), int(ds["gradient_accumulation_steps"])
    loader = TrainLoader(dataset, micro, state.rank, state.world_size, seed=cfg.data.seed,
                         workers=cfg.data.workers, flip=cfg.data.flip, normalize=cfg.data.normalize)
    model = build_model(cfg.model.network, embedding_size=cfg.model.embedding_size, dropout=cfg.model.dropout)
    if cfg.model.init != "per_group":
        from megaface.models.layers import init_conv_weights

        init_conv_weights(model, per_group=False)  # re-drawn from the seeded global generator
    h = cfg.head
    head = PartialFC(model.embedding_size, num_classes, margin=h.margin, scale=h.scale, sample_rate=h.sample_rate,
                     group=state.group, parallel=h.parallel, straight_through=h.straight_through,
                     seed=cfg.train.seed, margin_fallback=h.margin_fallback, init_std=h.init_std)
    parts = build_parts(cfg, ds, state, model, head, precision)
    per_epoch = max(len(loader) // gas, 1)
    total = cfg.train.max_steps or max(int(math.ceil(cfg.train.epochs * per_epoch)), 1)
    validator = None
    bins = list(cfg.validation.bins) + extra_bins
    if cfg.validation.interval > 0 and bins:
        from megaface.eval.validation import Validator

        validator = Validator(bins, state, batch_size=cfg.validation.batch_size, normalize=cfg.data.normalize)
    return Run(cfg, ds, state, parts, loader, validator, Path(cfg.train.output_dir), total,
               resolve_milestones(cfg.optim, per_epoch), gas, num_classes, model.network_name,
               model.embedding_size)
