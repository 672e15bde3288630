"""MobileFaceNet backbones (Chen et al. 2018) and their width/depth variants.

One spec-driven network covers:
- ``mobilefacenet``: the seed's fmobilefacenet = MobileFaceNet "y1": 128-d, GDC head (7x7 global depthwise
  conv -> linear 1x1 to D -> BatchNorm1d without scale), conv BatchNorm eps 1e-3, PReLU.
- ``mobilefacenet_wide``: arcface_torch's ``mbf`` (its default 512-d recognition network): every block
  *output* twice as wide (stem 128, stages 128/256/256) while the expansion widths stay those of y1
  (128/256/512/256), so the inverted bottlenecks of stages 1 and 3 have expansion 1; the stem's second 3x3
  conv becomes a grouped conv (64 groups of 2 channels) instead of a depthwise one; D = 512.
- ``mobilefacenet_large``: arcface_torch's ``mbf_large`` (outputs x4, twice the blocks, 512-d).
- ``mobilefacenet_tiny``: NOT a published network. Half the widths of y1, one residual bottleneck per
  stage and a 256-wide GDC head (0.14 M parameters, 23.8 M MAdds at 112x112, vs 1.0 M / 221 M for y1),
  for CPU quickstarts and tests only.

Module tree and state-dict keys follow arcface_torch's mbf layout (``layers.<i>``, ``conv_sep``,
``features.layers.{0,2,3}``; every conv unit holds its conv/BN/PReLU in a ``layers`` Sequential) so an
arcface_torch checkpoint maps key for key; see docs/insightface_mapping.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import Backbone, ScalelessBatchNorm1d, check_input, init_conv_weights

# The seed's conv BatchNorm eps (OneFlow/MXNet fmobilefacenet) and its embedding BatchNorm eps.
CONV_BN_EPS = 1e-3
EMBEDDING_BN_EPS = 2e-5
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class MobileFaceNetSpec:
    """Shape of a MobileFaceNet.

    stem_channels: width of the 3x3 stride-2 stem conv (112 -> 56).
    stem_groups: groups of the following 3x3 conv (== stem_channels: depthwise) when stem_blocks == 1;
        otherwise the expansion width of the stem's residual bottlenecks.
    stem_blocks: 1 = a single grouped 3x3 conv unit; > 1 = that many residual bottlenecks.
    stages: (out_channels, down_expand, residual_blocks, residual_expand) per stage; each stage starts
        with a stride-2 bottleneck of expansion width down_expand (56 -> 28 -> 14 -> 7).
    sep_channels: width of the 1x1 conv before the GDC head.
    embedding_size: default output width D.
    """

    stem_channels: int
    stem_groups: int
    stem_blocks: int
    stages: tuple[tuple[int, int, int, int], ...]
    sep_channels: int
    embedding_size: int


MOBILEFACENET_SPECS: dict[str, MobileFaceNetSpec] = {
    "mobilefacenet": MobileFaceNetSpec(
        64, 64, 1, ((64, 128, 4, 128), (128, 256, 6, 256), (128, 512, 2, 256)), 512, 128),
    "mobilefacenet_wide": MobileFaceNetSpec(
        128, 64, 1, ((128, 128, 4, 128), (256, 256, 6, 256), (256, 512, 2, 256)), 512, 512),
    "mobilefacenet_large": MobileFaceNetSpec(
        256, 128, 2, ((256, 128, 8, 128), (512, 256, 12, 256), (512, 512, 4, 256)), 512, 512),
    "mobilefacenet_tiny": MobileFaceNetSpec(
        32, 32, 1, ((32, 32, 1, 64), (64, 128, 1, 128), (64, 128, 1, 128)), 256, 128),
}


class ConvUnit(nn.Module):
    """conv (no bias) -> BatchNorm2d (-> PReLU when ``activation``); held in ``self.layers``."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 padding: int | None = None, activation: bool = True, eps: float = CONV_BN_EPS,
                 momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        padding = kernel // 2 if padding is None else padding
        parts: list[nn.Module] = [
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c, eps=eps, momentum=momentum),
        ]
        if activation:
            parts.append(nn.PReLU(out_c))
        self.layers = nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """Inverted bottleneck: 1x1 expand + PReLU -> 3x3 depthwise(stride) + PReLU -> 1x1 linear project."""

    def __init__(self, in_c: int, out_c: int, expand: int, stride: int, residual: bool, eps: float,
                 momentum: float) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvUnit(in_c, expand, 1, eps=eps, momentum=momentum),
            ConvUnit(expand, expand, 3, stride, groups=expand, eps=eps, momentum=momentum),
            ConvUnit(expand, out_c, 1, activation=False, eps=eps, momentum=momentum),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class ResidualStack(nn.Module):
    """``blocks`` stride-1 residual bottlenecks of constant width; held in ``self.layers``."""

    def __init__(self, channels: int, blocks: int, expand: int, eps: float, momentum: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[Bottleneck(channels, channels, expand, 1, True, eps, momentum) for _ in range(blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDCHead(nn.Module):
    """Global depthwise conv 7x7 (linear) -> flatten -> linear to D -> BatchNorm1d without scale.

    The seed's ``pre_fc1`` also had a bias; it is omitted because the BatchNorm right after it
    subtracts the batch mean (a bias there only shifts running_mean and is never learned usefully).
    """

    def __init__(self, channels: int, embedding_size: int, eps: float, embedding_eps: float,
                 momentum: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvUnit(channels, channels, 7, groups=channels, padding=0, activation=False, eps=eps,
                     momentum=momentum),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            ScalelessBatchNorm1d(embedding_size, eps=embedding_eps, momentum=momentum),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(Backbone):
    """MobileFaceNet family member: float [N, 3, 112, 112] -> embeddings [N, embedding_size]."""

    def __init__(self, network_name: str, spec: MobileFaceNetSpec, embedding_size: int | None = None,
                 bn_eps: float | None = None, bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.network_name = network_name
        self.embedding_size = int(embedding_size or spec.embedding_size)
        eps = CONV_BN_EPS if bn_eps is None else bn_eps
        embedding_eps = EMBEDDING_BN_EPS if bn_eps is None else bn_eps
        kw: dict[str, Any] = {"eps": eps, "momentum": bn_momentum}
        stem = spec.stem_channels
        self.layers = nn.ModuleList([ConvUnit(3, stem, 3, 2, **kw)])
        if spec.stem_blocks == 1:
            self.layers.append(ConvUnit(stem, stem, 3, 1, groups=spec.stem_groups, **kw))
        else:
            self.layers.append(ResidualStack(stem, spec.stem_blocks, spec.stem_groups, **kw))
        in_c = stem
        for out_c, down_expand, blocks, expand in spec.stages:
            self.layers.append(Bottleneck(in_c, out_c, down_expand, 2, False, **kw))
            self.layers.append(ResidualStack(out_c, blocks, expand, **kw))
            in_c = out_c
        self.conv_sep = ConvUnit(in_c, spec.sep_channels, 1, **kw)
        self.features = GDCHead(spec.sep_channels, self.embedding_size, eps, embedding_eps, bn_momentum)
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.network_name)
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))
