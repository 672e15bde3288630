"""The train step: one micro-batch through the data path, then both optimizer steps.

    images_local [b, 3, 112, 112] -> backbone (DeepSpeed engine, data parallel) -> embeddings_local [b, D]
      -> PartialFC: all-gather -> embeddings_global [B, D] -> FC7 shard logits [B, c] + margin
      -> distributed softmax CE (global-batch mean) -> engine.backward -> engine.step + FC7 step

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
from typing import Any

import torch

from megaface.distributed import DistState, comm
from megaface.train.build import TrainParts


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf under fp32/bf16 (fp16 skips such steps through loss scaling instead)."""


def train_step(parts: TrainParts, images: torch.Tensor, labels: torch.Tensor) -> float:
    """One micro-batch: backbone -> FC7 (all-gather, sharded logits + margin, distributed CE) -> backward -> steps.

    Returns the loss (global-batch mean, identical on every rank). Raises NonFiniteLoss before any update.
    """
    engine = parts.engine
    images = images.to(parts.state.device, parts.input_dtype, non_blocking=True)
    labels = labels.to(parts.state.device, non_blocking=True)
    embeddings_local = engine(images)                            # [b, 3, 112, 112] -> [b, D], data parallel
    loss = parts.head(embeddings_local, labels)                  # all-gather -> FC7 shard -> CE: global mean
    value = _global_loss(loss, parts)                            # host sync (needed for the stop decision)
    if not math.isfinite(value) and parts.precision != "fp16":
        raise NonFiniteLoss(value)
    boundary = engine.is_gradient_accumulation_boundary()        # before step(), which advances the counter
    engine.backward(loss)                                        # x loss scale / gas; DeepSpeed averages backbone
    scale, skipped_before = loss_scale(engine), engine.skipped_steps  # the scale this backward used
    engine.step()                                                # backbone step at the boundary (or fp16 skip)
    if boundary and parts.fc7_optimizer is not None:
        step_fc7(parts.fc7_optimizer, parts.state, scale, parts.clip, engine_step_applied(engine, skipped_before))
    return value


def _global_loss(loss: torch.Tensor, parts: TrainParts) -> float:
    if parts.fc7_optimizer is None and parts.state.world_size > 1:
        # data-parallel head: each rank has its local-batch loss; all ranks must agree on stopping
        return float(comm.all_reduce_(loss.detach().clone(), "avg", parts.state.group))
    return float(loss.detach())



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
