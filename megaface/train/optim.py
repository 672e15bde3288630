"""Optimizers and the learning rate from the experiment's optim section (one source of truth for both the
backbone, inside DeepSpeed, and the model-parallel FC7 shard).

    optimizer = backbone_optimizer(module.parameters(), cfg.optim)          # handed to deepspeed.initialize
    fc7 = fc7_optimizer(head, cfg.optim, cfg.head.lr_scale)                 # ShardSGD or ShardAdamW
The learning rate of both comes from `megaface.train.schedule.schedule_lr`.

Weight decay follows arcface_torch: one `optim.weight_decay` for every parameter (its train_v2 gives the
backbone's and the FC's parameters to one SGD / AdamW without a no-decay group; the ViT's no_weight_decay()
list is never used), so norms, biases, pos_embed and mask_token decay too.
"""
from __future__ import annotations

from typing import Iterable

import torch

from megaface.config import OptimConfig
from megaface.head import PartialFC, ShardAdamW, ShardSGD
from megaface.vocab import OPTIMIZER_NAMES


def backbone_optimizer(params: Iterable[torch.nn.Parameter], o: OptimConfig) -> torch.optim.Optimizer:
    """torch.optim.SGD (momentum, coupled weight decay) or torch.optim.AdamW (decoupled) per optim.name."""
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name={o.name!r} is not one of {list(OPTIMIZER_NAMES)}")


def fc7_optimizer(head: PartialFC, o: OptimConfig, lr_scale: float = 1.0,
                  momentum_dtype: str = "fp32") -> ShardSGD | ShardAdamW:
    """The model-parallel FC7 shard's optimizer: sparse over Partial FC rows (see head/optim.py, head/adamw.py)."""
    lr = o.lr * lr_scale
    if o.name == "adamw":
        return ShardAdamW(head, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "sgd":
        return ShardSGD(head, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                        momentum_dtype=momentum_dtype)
    raise ValueError(f"optim.name={o.name!r} is not one of {list(OPTIMIZER_NAMES)}")

