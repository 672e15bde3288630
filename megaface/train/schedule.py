"""The learning-rate schedule of both optimizers (backbone and FC7): pure functions of the 0-based iteration (optimizer step) index.

    lr = lr_at(iteration, "polynomial", base_lr=1e-3, warmup_steps=w, total_steps=t, power=1.0)

`iteration` is the index of the optimizer step about to be taken (0 for the first one); the loop sets the lr
of every optimizer (backbone and FC7, times head.lr_scale) to `lr_at(iteration, ...)` before that step.
Nothing here holds state, so resuming at iteration i needs only i.

step: linear warm-up (iteration + 1) / warmup_steps * base_lr for iteration < warmup_steps, then
    base_lr * gamma ** (number of milestones <= iteration). (megaface's historical schedule.)
polynomial: arcface_torch's PolynomialLRWarmup, value for value. Its scheduler is stepped once after every
    optimizer step, so the step with index i runs at the lr the scheduler holds after i calls to step():
        i == 0                : base_lr          (the scheduler's construction step returns the initial lr;
                                                  arcface_torch's first step therefore runs at full lr)
        1 <= i <= warmup      : base_lr * i / warmup
        warmup < i            : base_lr * (1 - (min(i, total) - warmup) / (total - warmup)) ** power
    reaching 0 at i == total and staying there. arcface_torch's train_v2 passes no power, so it trains with
    the class default 1.0 (linear decay); its lr_scheduler's demo uses 2.0. Note that arcface_torch steps its
    scheduler per *micro* batch under gradient accumulation (its warmup/total count micro batches); here
    iterations are optimizer steps, so divide its counts by the accumulation to convert.
"""
from __future__ import annotations

from typing import Any, Sequence

from megaface.config import OptimConfig
from megaface.vocab import SCHEDULES


def step_lr(iteration: int, base_lr: float, warmup_steps: int, milestones: Sequence[int], gamma: float) -> float:
    """Linear warm-up to base_lr over warmup_steps, then x gamma at each milestone passed."""
    if warmup_steps > 0 and iteration < warmup_steps:
        return base_lr * (iteration + 1) / warmup_steps
    return base_lr * gamma ** sum(1 for m in milestones if iteration >= m)


def polynomial_lr(iteration: int, base_lr: float, warmup_steps: int, total_steps: int, power: float) -> float:
    """arcface_torch's PolynomialLRWarmup after `iteration` scheduler steps (see the module docstring)."""
    if total_steps <= warmup_steps:
        raise ValueError(f"polynomial schedule needs total_steps > warmup_steps, got total_steps={total_steps}, "
                         f"warmup_steps={warmup_steps}; lower optim.warmup_* or train longer")
    if iteration == 0:
        return base_lr
    if iteration <= warmup_steps:
        return base_lr * iteration / warmup_steps
    done = (min(iteration, total_steps) - warmup_steps) / (total_steps - warmup_steps)
    return base_lr * (1.0 - done) ** power


def lr_at(iteration: int, schedule: str, base_lr: float, warmup_steps: int = 0, total_steps: int | None = None,
          milestones: Sequence[int] = (), gamma: float = 0.1, power: float = 1.0) -> float:
    """Learning rate of optimizer step `iteration` (0-based) under `schedule` ("step" or "polynomial").

    total_steps: the run length in optimizer steps (polynomial only: the lr reaches 0 there).
    milestones / gamma: step only. power: polynomial only.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if schedule == "step":
        return step_lr(iteration, base_lr, warmup_steps, milestones, gamma)
    if schedule == "polynomial":
        if total_steps is None:
            raise ValueError("polynomial schedule needs total_steps (train.max_steps or train.epochs)")
        return polynomial_lr(iteration, base_lr, warmup_steps, total_steps, power)
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {list(SCHEDULES)}")


def resolve_warmup(warmup_steps: int, warmup_epochs: float, iterations_per_epoch: int) -> int:
    """Warm-up length in iterations from optim.warmup_steps or optim.warmup_epochs (at most one is set)."""
    if warmup_epochs:
        return int(round(warmup_epochs * iterations_per_epoch))
    return int(warmup_steps)


def resolve_milestones(o: OptimConfig, iterations_per_epoch: int) -> list[int]:
    """optim.milestones, or optim.milestone_epochs converted with the loader's iterations per epoch."""
    if o.milestone_epochs:
        return [int(round(e * iterations_per_epoch)) for e in o.milestone_epochs]
    return list(o.milestones)


def schedule_lr(iteration: int, o: OptimConfig, milestones: Sequence[int], warmup_steps: int,
                total_steps: int | None) -> float:
    """The backbone lr of optimizer step `iteration` (0-based); FC7 takes this x head.lr_scale.

    milestones / warmup_steps: already in iterations (`resolve_milestones`, `resolve_warmup`);
    total_steps: the run length in iterations (the polynomial schedule reaches 0 there).
    """
    return lr_at(iteration, o.schedule, o.lr, warmup_steps, total_steps, milestones, o.gamma, o.power)


def set_lr(parts: Any, lr: float, fc7_lr_scale: float) -> None:
    """Set the lr of the backbone optimizer (inside the engine) and of the FC7 shard optimizer."""
    for group in parts.engine.optimizer.param_groups:
        group["lr"] = lr
    if parts.fc7_optimizer is not None:
        for group in parts.fc7_optimizer.param_groups:
            group["lr"] = lr * fc7_lr_scale
