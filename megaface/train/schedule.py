"""The learning-rate schedule shared by the backbone optimizer and the FC7 shard optimizer."""

from __future__ import annotations

from typing import Any

from megaface.config import OptimConfig


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


def set_lr(parts: Any, lr: float, fc7_lr_scale: float) -> None:
    for group in parts.engine.optimizer.param_groups:
        group["lr"] = lr
    if parts.fc7_optimizer is not None:
        for group in parts.fc7_optimizer.param_groups:
            group["lr"] = lr * fc7_lr_scale


