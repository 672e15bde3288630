"""DeepSpeed for the backbone, a separate optimizer for the model-parallel FC7, and the lr schedule.

Why the FC7 shard stays outside the engine: every rank holds different classifier rows whose gradients are
already complete (each rank saw the whole global batch through the all-gather), so they must be neither
averaged across ranks nor partitioned by ZeRO. DeepSpeed therefore only sees the backbone; the shard gets
`megaface.head.ShardSGD`. With head.parallel = "data" the replicated FC7 goes into the engine with the
backbone (a `DataParallelFace` container) and DeepSpeed averages its gradients like the backbone's.

Keeping the two optimizers in step (`step_fc7`):
- accumulation: `engine.backward` divides the loss by gradient_accumulation_steps before backward, so the
  FC7 gradients receive the same 1/gas factor and accumulate in `.grad`; FC7 steps only at the boundary;
- fp16: the loss the engine backpropagates is multiplied by its dynamic loss scale; FC7 gradients are
  divided by that scale (read before `engine.step()`, which may change it), and the FC7 step is skipped
  whenever the engine skipped (overflow, decided over all ranks by DeepSpeed) or the FC7 gradients
  themselves are non-finite on any rank (their squared norm is all-reduced) - so all ranks skip alike;
- clipping: DeepSpeed clips the backbone by the backbone's global norm (the JSON's gradient_clipping); FC7
  is clipped by the global FC7 norm, sqrt(all-reduced sum of the shards' squared norms), at head.clip_grad_norm
  (None = the JSON's value, 0 = off). The two parts are clipped separately, not by one joint norm.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megaface.config import ExperimentConfig, OptimConfig
from megaface.dist import DistState, comm


class DataParallelFace(nn.Module):
    """Backbone + replicated FC7 in one module, so DeepSpeed averages the FC7 gradients too."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


class CastInputs(nn.Module):
    """Feed the backbone inputs in its parameter dtype (bf16/fp16 engines) and return fp32 embeddings.

    Used for validation, where float32 images meet a bf16 module."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.module.parameters()).dtype
        return self.module(images.to(dtype)).float()


@dataclass
class TrainParts:
    """What the train step needs. `fc7_optimizer` is None when the head lives inside the engine."""

    engine: Any
    head: nn.Module
    fc7_optimizer: torch.optim.Optimizer | None
    backbone: nn.Module
    state: DistState
    clip: float
    precision: str
    input_dtype: torch.dtype


def _skip_shm_build() -> None:
    """On CPU, stop DeepSpeed from compiling its shared-memory all-reduce op (~23 s on a fresh machine).

    DeepSpeed builds it whenever its comm backend starts; only DeepSpeed's inference all-reduce uses it,
    training collectives go through the torch process group megaface already created. MEGAFACE_DS_SHM=1
    keeps DeepSpeed's behaviour."""
    if os.environ.get("MEGAFACE_DS_SHM") == "1":
        return
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports the name `torch`
    # (the torch package), which shadows the submodule in attribute lookup
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def build_parts(cfg: ExperimentConfig, ds: dict[str, Any], state: DistState, backbone: nn.Module,
                head: nn.Module, precision: str) -> TrainParts:
    """deepspeed.initialize for the backbone (+ data-parallel head); ShardSGD for a model-parallel head."""
    import deepspeed

    if state.device.type == "cpu":
        _skip_shm_build()
    o = cfg.optim
    module: nn.Module = DataParallelFace(backbone, head) if cfg.head.parallel == "data" else backbone
    # Built here (not from the JSON) so that one schedule drives both optimizers; DeepSpeed wraps it.
    optimizer = torch.optim.SGD(module.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds,
                                           dist_init_required=False)
    fc7_optimizer = None
    if cfg.head.parallel == "model":
        from megaface.head import ShardSGD

        head.to(state.device)
        fc7_optimizer = ShardSGD(head, lr=o.lr * cfg.head.lr_scale, momentum=o.momentum,
                                 weight_decay=o.weight_decay)
    input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if input_dtype != torch.float32:
        # DeepSpeed casts parameters but not buffers; BatchNorm refuses bf16 weights with fp32 running stats
        for buffer in engine.module.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(input_dtype)
    live_head = engine.module.head if cfg.head.parallel == "data" else head
    live_backbone = engine.module.backbone if cfg.head.parallel == "data" else engine.module
    return TrainParts(engine, live_head, fc7_optimizer, live_backbone, state,
                      fc7_max_norm(cfg.head.clip_grad_norm, ds), precision, input_dtype)


def fc7_max_norm(clip_grad_norm: float | None, ds: dict[str, Any]) -> float:
    """FC7's max gradient norm: head.clip_grad_norm, or the JSON's gradient_clipping when it is None; 0 = off."""
    if clip_grad_norm is None:
        return float(ds.get("gradient_clipping", 0.0))
    return float(clip_grad_norm)


# ---- lr schedule ------------------------------------------------------------------------------------------

def lr_at(iteration: int, o: OptimConfig, milestones: list[int], lr: float | None = None) -> float:
    """Learning rate for 0-based `iteration`: linear warm-up, then x gamma at each milestone passed."""
    base = o.lr if lr is None else lr
    if o.warmup_steps > 0 and iteration < o.warmup_steps:
        return base * (iteration + 1) / o.warmup_steps
    passed = sum(1 for m in milestones if iteration >= m)
    return base * (o.gamma ** passed)


def resolve_milestones(o: OptimConfig, iterations_per_epoch: int) -> list[int]:
    if o.milestone_epochs:
        return [int(round(e * iterations_per_epoch)) for e in o.milestone_epochs]
    return list(o.milestones)


def set_lr(parts: TrainParts, lr: float, fc7_lr_scale: float) -> None:
    for group in parts.engine.optimizer.param_groups:
        group["lr"] = lr
    if parts.fc7_optimizer is not None:
        for group in parts.fc7_optimizer.param_groups:
            group["lr"] = lr * fc7_lr_scale


# ---- fp16 loss scale and the FC7 step ------------------------------------------------------------------

def loss_scale(engine: Any) -> float:
    """The dynamic (or static) loss scale the engine multiplied the loss by; 1.0 without fp16."""
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    for holder in (getattr(opt, "loss_scale_config", None), getattr(opt, "loss_scaler", None), opt):
        value = getattr(holder, "cur_scale", None) if holder is not None else None
        if value is not None:
            return float(value)
    return float(getattr(opt, "loss_scale", 1.0))


def engine_step_applied(engine: Any, skipped_before: int) -> bool:
    applied = getattr(engine, "was_step_applied", None)
    return bool(applied()) if applied is not None else engine.skipped_steps == skipped_before


@torch.no_grad()
def step_fc7(optimizer: torch.optim.Optimizer, state: DistState, scale: float, max_norm: float,
             engine_applied: bool) -> bool:
    """Unscale, check, clip and step the FC7 shard optimizer at an accumulation boundary; True if stepped."""
    grads = [g for g in optimizer.grads() if g is not None]
    if scale != 1.0:
        for g in grads:
            g.div_(scale)
    local_sq = torch.zeros((), dtype=torch.float32, device=state.device)
    for g in grads:
        local_sq += g.float().pow(2).sum()
    global_sq = comm.all_reduce_(local_sq, "sum", state.group)  # one collective: norm and finiteness
    sq = float(global_sq)  # host sync: the decision must be the same on every rank
    if not engine_applied or not math.isfinite(sq):
        optimizer.zero_grad()
        return False
    if max_norm > 0:
        coef = max_norm / (math.sqrt(sq) + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    optimizer.step()
    optimizer.zero_grad()
    return True
