"""AdaFace (Kim et al., CVPR 2022): a margin that adapts to each sample's image quality, read from its feature norm.

Per sample i of the global batch, with ||z_i|| the norm of its embedding before normalisation:
    n_i      = clip(||z_i||, 0.001, 100)                           (detached: no gradient reaches the norm)
    mu, sd   = EMA of the batch mean and (unbiased) std of n:      mu <- a * mean(n) + (1 - a) * mu  (a = t_alpha)
    q_i      = clip(h * (n_i - mu) / (sd + eps), -1, 1)            (the "margin scaler"; eps = 1e-3)
    g_ang_i  = -m * q_i,   g_add_i = m + m * q_i
    target   = cos(clip(theta_i + g_ang_i, eps, pi - eps)) - g_add_i,   theta_i = arccos(clip(cos, -1+eps, 1-eps))
High-norm (good-quality) samples get an angular margin (ArcFace-like), low-norm ones an additive one
(CosFace-like) that is smaller, so hard, unrecognisable images are not forced onto their class. The EMA is
updated first and then used for the same batch; it starts at mu = 20, sd = 100 and moves only in training.

In the sharded head the norms are all-gathered ([b] per rank -> [B]), so mean, std, EMA and every margin are
the same numbers on every rank and at every world size. The EMA lives in two fp32 buffers (`batch_mean`,
`batch_std`): in `head.state_dict()`, and in the FC7 shard files as `margin_state` (run-wide, merged and
resharded by `megaface convert fc7` like any run-wide key), so a resume continues bit-exactly.

Differences from the AdaFace repository's head (github:mk-minchul/AdaFace, head.py), which computes the same
loss on the same inputs: it clamps every cosine of the logit matrix to [-1 + eps, 1 - eps], megaface only the
target's (a non-target cosine beyond 0.999 keeps its value); its statistics are per GPU, megaface's global.
Gradient: the true derivative through arccos (as the repository), or straight-through (d/dcos = 1).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from megaface.head.margin import Margin
from megaface.utils.ranges import Range, check_range

EPS = 1e-3
NORM_RANGE = (0.001, 100.0)
START_MEAN, START_STD = 20.0, 100.0

# The one rule for AdaFace's parameters (config key -> range), checked by the config and by AdaFaceMargin.
# m in [0, pi/2) for the reason of m2 in `megaface.head.margin.MARGIN_RANGES`: a high-quality sample's
# angular margin reaches m and a low-quality one's additive margin 2m, and from pi/2 on no target can lead.
ADAFACE_RANGES: dict[str, Range] = {
    "head.adaface.m": (0.0, math.pi / 2, False, True),  # AdaFace margin size (0.4)
    "head.adaface.h": (0.0, math.inf, False, True),  # AdaFace concentration (0.333)
    "head.adaface.t_alpha": (0.0, 1.0, False, False),  # AdaFace EMA momentum (0.01)
}


class AdaFaceMargin(nn.Module, Margin):
    """The AdaFace margin with its norm statistics (buffers); `for_batch` binds one forward's margins."""

    batch_mean: torch.Tensor  # [1] fp32 buffers: the EMA of the global batch's norm mean and std
    batch_std: torch.Tensor

    def __init__(self, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01,
                 straight_through: bool = False) -> None:
        super().__init__()
        for name, value in (("m", m), ("h", h), ("t_alpha", t_alpha)):
            check_range(f"AdaFace {name}", float(value), ADAFACE_RANGES[f"head.adaface.{name}"],
                        "the paper uses m=0.4, h=0.333, t_alpha=0.01")
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)
        self.straight_through = bool(straight_through)
        self.register_buffer("batch_mean", torch.full((1,), START_MEAN))
        self.register_buffer("batch_std", torch.full((1,), START_STD))

    def extra_repr(self) -> str:
        return f"m={self.m}, h={self.h}, t_alpha={self.t_alpha}, straight_through={self.straight_through}"

    def describe(self) -> dict[str, Any]:
        return {"name": "adaface", "m": self.m, "h": self.h, "t_alpha": self.t_alpha}

    def state(self) -> dict[str, torch.Tensor]:
        return {"batch_mean": self.batch_mean.detach().to("cpu", copy=True),
                "batch_std": self.batch_std.detach().to("cpu", copy=True)}

    def load_state(self, state: dict[str, Any] | None, where: str) -> None:
        if not isinstance(state, dict) or not all(torch.is_tensor(state.get(k)) for k in ("batch_mean", "batch_std")):
            raise ValueError(f"{where}: no AdaFace norm statistics (margin_state with batch_mean, batch_std): the "
                             "checkpoint was not trained with head.margin=adaface; resume with its margin")
        with torch.no_grad():
            self.batch_mean.copy_(state["batch_mean"].reshape(1))
            self.batch_std.copy_(state["batch_std"].reshape(1))

    def for_batch(self, embeddings_local: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None,
                  training: bool) -> _AdaFaceBatch:
        """embeddings_local [b, D] (before normalisation) -> the margins of the global batch [B].

        `gather` all-gathers a [b] tensor into [B] (None: one rank). Training forwards update the EMA first.
        """
        with torch.no_grad():
            norms = torch.linalg.vector_norm(embeddings_local.detach().float(), dim=1)
            if gather is not None:
                norms = gather(norms)
            safe = norms.clamp(*NORM_RANGE)
            if training:
                std = safe.std() if safe.numel() > 1 else torch.zeros((), device=safe.device)
                self.batch_mean.copy_(safe.mean() * self.t_alpha + (1.0 - self.t_alpha) * self.batch_mean)
                self.batch_std.copy_(std * self.t_alpha + (1.0 - self.t_alpha) * self.batch_std)
            scaler = ((safe - self.batch_mean) / (self.batch_std + EPS) * self.h).clamp(-1.0, 1.0)
        return _AdaFaceBatch(-self.m * scaler, self.m + self.m * scaler, self.straight_through)


class _AdaFaceBatch(Margin):
    """The margins of one forward: angular g_ang [B] and additive g_add [B] per global-batch sample."""

    def __init__(self, g_angular: torch.Tensor, g_additive: torch.Tensor, straight_through: bool) -> None:
        self.g_angular, self.g_additive, self.straight_through = g_angular, g_additive, straight_through

    def _value(self, cos_t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cos_t.clamp(-1.0 + EPS, 1.0 - EPS))
        theta_m = (theta + self.g_angular.index_select(0, rows)).clamp(EPS, math.pi - EPS)
        return torch.cos(theta_m) - self.g_additive.index_select(0, rows)

    def __call__(self, cos_t: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            raise ValueError("the AdaFace margin is per sample: pass the global-batch rows of the cosines")
        if not self.straight_through:
            return self._value(cos_t, rows)
        with torch.no_grad():
            shift = self._value(cos_t, rows) - cos_t
        return cos_t + shift
