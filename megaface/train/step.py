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

Host syncs (a GPU stalls until the host has read a device value): fp32/bf16 steps read no device value
(no `.item()`, `.tolist()`, `.cpu()`; tests/unit/test_step_syncs.py counts them). Labels are range-checked where
each record is read (megaface.data.loader); the head only keeps a device-side assert. What remains are the
data-dependent sizes inside the head, implicit syncs on a GPU: the softmax's `nonzero` of the targets on this
rank (one per step; one more per block with inter-class filtering) and, with Partial FC, the `unique` of the
positive classes whose count sets the number of sampled rows (megaface.head.softmax / partial_fc). The loss stays
on the device; the loop keeps each iteration's loss and reads them all at once (`read_losses`: one sync, and
for a data-parallel head one all-reduce) only when it logs, validates or saves - and a non-finite one stops
the run before anything is saved. FC7 needs no norm without clipping; with clipping the norm is all-reduced
and the clip coefficient is applied on the device. Only fp16 keeps one sync per step (`step_fc7`): the FC7
skip decision must be the same on every rank and match the engine's, which DeepSpeed itself takes on the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megaface.data.augment import RawBatch, prepare_batch
from megaface.distributed import DistState, comm
from megaface.head.optim import ShardOptimizer
from megaface.train.build import TrainParts


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf under fp32/bf16 (fp16 skips such steps through loss scaling instead)."""

    def __init__(self, value: float, iteration: int) -> None:
        super().__init__(f"{value} at iteration {iteration}")
        self.value, self.iteration = value, iteration


def train_step(parts: TrainParts, images: torch.Tensor | RawBatch, labels: torch.Tensor) -> torch.Tensor:
    """One micro-batch: backbone -> FC7 (all-gather, sharded logits + margin, distributed CE) -> backward -> steps.

    Returns the detached loss on the device, without a host sync: the global-batch mean with a model-parallel
    head, this rank's mean with a data-parallel one (`read_losses` averages those when it reads them).
    """
    engine = parts.engine
    if isinstance(images, RawBatch):  # uint8 on the device: flip, augment, normalise there (megaface.data.augment)
        images = prepare_batch(images.to(parts.state.device), parts.normalize, parts.input_dtype, parts.input_format)
    else:
        layout = parts.input_format if images.dim() == 4 else torch.preserve_format  # NHWC: model.channels_last
        images = images.to(parts.state.device, parts.input_dtype, non_blocking=True, memory_format=layout)
    labels = labels.to(parts.state.device, non_blocking=True)
    embeddings_local = engine(images)                            # [b, 3, 112, 112] -> [b, D], data parallel
    loss = parts.head(embeddings_local, labels)                  # all-gather -> FC7 shard -> CE: global mean
    boundary = engine.is_gradient_accumulation_boundary()        # before step(), which advances the counter
    engine.backward(loss)                                        # x loss scale / gas; DeepSpeed averages backbone
    fp16 = parts.precision == "fp16"
    scale, skipped_before = (loss_scale(engine), engine.skipped_steps) if fp16 else (None, 0)  # this backward's
    engine.step()                                                # backbone step at the boundary (or fp16 skip)
    if boundary and parts.fc7_optimizer is not None:
        applied = engine_step_applied(engine, skipped_before) if fp16 else True
        step_fc7(parts.fc7_optimizer, parts.state, scale, parts.clip, applied)
    return loss.detach()


def read_losses(pending: list[torch.Tensor], parts: TrainParts, first_iteration: int) -> list[float]:
    """The host values of the iteration losses kept on the device since the last read (one sync).

    `pending[i]` is iteration `first_iteration + i`. With a data-parallel head each rank holds its own
    local-batch losses: they are averaged (one all-reduce) so that every rank logs, and stops, alike.
    Raises NonFiniteLoss (fp32/bf16) for the first non-finite one; fp16 skips such steps instead.
    """
    if not pending:
        return []
    stacked = torch.stack([p.float() for p in pending])
    if parts.fc7_optimizer is None and parts.state.world_size > 1:
        stacked = comm.all_reduce_(stacked, "avg", parts.state.group)
    values = stacked.tolist()  # the host sync, once per log interval
    if parts.precision != "fp16":
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLoss(value, first_iteration + offset)
    return values


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
def step_fc7(optimizer: ShardOptimizer, state: DistState, scale: float | None, max_norm: float,
             engine_applied: bool) -> bool:
    """Unscale, check, clip and step the FC7 shard optimizer at an accumulation boundary; True if stepped.

    `scale` is the fp16 loss scale, None without loss scaling (fp32/bf16). Collectives and host syncs:
    fp32/bf16 without clipping: none; with clipping: one all-reduce of the squared norm, applied on the device
    (a non-finite norm yields non-finite weights, which the non-finite loss then stops before any save);
    fp16: the same all-reduce and one host read, so that every rank skips alike and with the engine.
    """
    grads = [g for g in optimizer.grads() if g is not None]
    if scale is None and max_norm <= 0:
        optimizer.step()
        optimizer.zero_grad()
        return True
    if scale is not None and scale != 1.0:
        for g in grads:
            g.div_(scale)
    local_sq = torch.zeros((), dtype=torch.float32, device=state.device)
    for g in grads:
        local_sq += g.float().pow(2).sum()
    global_sq = comm.all_reduce_(local_sq, "sum", state.group)  # one collective: norm and finiteness
    if scale is not None and (not engine_applied or not math.isfinite(float(global_sq))):  # fp16: host sync
        optimizer.zero_grad()
        return False
    if max_norm > 0:
        coef = (max_norm / (global_sq.sqrt() + 1e-6)).clamp(max=1.0)  # on the device: no host read
        for g in grads:
            g.mul_(coef.to(g.dtype))
    optimizer.step()
    optimizer.zero_grad()
    return True
