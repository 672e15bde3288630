"""megaface.train.optim: the optimizers and lr that the optim section asks for."""
from __future__ import annotations

import pytest
import torch

from megaface.config import OptimConfig
from megaface.head import PartialFC, ShardAdamW, ShardSGD
from megaface.train.optim import backbone_optimizer, fc7_optimizer
from megaface.train.schedule import schedule_lr

ADAMW = OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)


def test_backbone_optimizers_carry_the_config():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = backbone_optimizer(model.parameters(), ADAMW)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.98), 1e-7, 0.1)
    assert len(opt.param_groups) == 1 and len(group["params"]) == 4  # norms and biases decay too (arcface_torch)
    sgd = backbone_optimizer(model.parameters(), OptimConfig())
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


def test_fc7_optimizer_follows_optim_name_and_lr_scale():
    head = PartialFC(8, 20, sample_rate=0.5)
    adamw = fc7_optimizer(head, ADAMW, lr_scale=2.0)
    assert isinstance(adamw, ShardAdamW) and adamw.param_groups[0]["lr"] == pytest.approx(2e-3)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.98)
    assert isinstance(fc7_optimizer(head, OptimConfig()), ShardSGD)


def test_schedule_lr_dispatches():
    poly = OptimConfig(lr=1.0, schedule="polynomial", power=2.0)
    assert schedule_lr(60, poly, [], 10, 110) == pytest.approx(0.25)
    step = OptimConfig(lr=1.0, gamma=0.5)
    assert schedule_lr(7, step, [5], 0, None) == 0.5
