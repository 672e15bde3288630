"""megaface.train.schedule against step-by-step reimplementations of the schedulers it mirrors."""
from __future__ import annotations

import pytest
import torch

from megaface.train.schedule import lr_at, resolve_warmup


class ChainedPolynomialWarmup:
    """The stepping behaviour of arcface_torch's PolynomialLRWarmup, written as the recurrence it runs:
    construction leaves the lr at base (epoch 0); each step() increments the epoch, then during warm-up sets
    base * epoch / warmup, afterwards multiplies the current lr by the ratio of consecutive decay factors,
    and past total_iters leaves it unchanged."""

    def __init__(self, base: float, warmup: int, total: int, power: float) -> None:
        self.base, self.warmup, self.total, self.power = base, warmup, total, power
        self.epoch, self.lr = 0, base

    def step(self) -> None:
        self.epoch += 1
        e, w, t = self.epoch, self.warmup, self.total
        if e > t:
            return
        if e <= w:
            self.lr = self.base * e / w
        else:
            self.lr *= ((1.0 - (e - w) / (t - w)) / (1.0 - (e - 1 - w) / (t - w))) ** self.power


@pytest.mark.parametrize("warmup, total, power", [(10, 100, 2.0), (10, 100, 1.0), (0, 37, 2.0), (4, 5, 1.0),
                                                  (100, 1000, 2.0)])
def test_polynomial_equals_the_stepped_scheduler(warmup, total, power):
    ref = ChainedPolynomialWarmup(0.1, warmup, total, power)
    for iteration in range(total + 20):
        # the optimizer step with index `iteration` runs before the scheduler's step() of that iteration
        assert lr_at(iteration, "polynomial", 0.1, warmup, total, power=power) == pytest.approx(ref.lr, abs=1e-12)
        ref.step()
    assert lr_at(total, "polynomial", 0.1, warmup, total, power=power) == 0.0


def test_polynomial_without_warmup_equals_torch_polynomial_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=50, power=2.0)
    for iteration in range(60):
        assert lr_at(iteration, "polynomial", 0.5, 0, 50, power=2.0) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_polynomial_shape():
    lrs = [lr_at(i, "polynomial", 1.0, 10, 110, power=2.0) for i in range(111)]
    assert lrs[0] == 1.0 and lrs[1] == pytest.approx(0.1) and lrs[10] == 1.0
    assert lrs[60] == pytest.approx(0.25)  # half way through the decay: (1 - 1/2) ** 2
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_step_schedule():
    lrs = [lr_at(i, "step", 0.1, 4, milestones=[6, 8], gamma=0.1) for i in range(10)]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4:] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_schedule_lr_reads_the_optim_section():
    from megaface.config import OptimConfig
    from megaface.train.schedule import schedule_lr

    o = OptimConfig(lr=0.2, warmup_steps=3, milestones=[5, 7], gamma=0.5)
    expected = [0.2 / 3, 0.4 / 3, 0.2, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05]  # warm-up, then x0.5 at 5 and 7
    assert [schedule_lr(i, o, [5, 7], 3, None) for i in range(10)] == pytest.approx(expected)


@pytest.mark.parametrize("args, match", [
    ((0, "cosine", 0.1), "unknown lr schedule"),
    ((0, "polynomial", 0.1, 10, 10), "total_steps > warmup_steps"),
    ((0, "polynomial", 0.1, 0, None), "total_steps"),
    ((-1, "step", 0.1), "iteration"),
])
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        lr_at(*args)


def test_resolve_warmup():
    assert resolve_warmup(0, 4.0, 100) == 400
    assert resolve_warmup(7, 0.0, 100) == 7
