"""IResNet backbones (18/34/50/100/200) with the seed's "E" output head.

Body: a 3x3 stem (stride 1) + BN + PReLU, then four stages of improved residual units
(BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a projected shortcut on the first unit of
each stage), each stage halving the resolution: 112 -> 56 -> 28 -> 14 -> 7.
Head "E": BN -> dropout -> flatten(512 x 7 x 7) -> FC -> BatchNorm1d without scale.

State-dict keys follow the arcface_torch layout (conv1, bn1, prelu, layer1..4.<i>.{bn1, conv1, bn2,
prelu, conv2, bn3, downsample.0, downsample.1}, bn2, fc, features) so that interop is a key-for-key
match; see docs/insightface_mapping.md.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import Backbone, ScalelessBatchNorm1d, check_input, init_conv_weights

# Units per stage of each depth (He et al. counting: depth = 2 * sum(units) + 2).
IRESNET_UNITS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
STAGE_CHANNELS = (64, 128, 256, 512)
# The seed's BatchNorm: eps 2e-5, MXNet momentum 0.9 == PyTorch momentum 0.1.
BN_EPS = 2e-5
BN_MOMENTUM = 0.1


def _bn2d(channels: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


class IResidualUnit(nn.Module):
    """Pre-activation-style unit; the stride sits on the second conv (as in the seed)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, eps: float, momentum: float):
        super().__init__()
        self.bn1 = _bn2d(in_channels, eps, momentum)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = _bn2d(out_channels, eps, momentum)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False)
        self.bn3 = _bn2d(out_channels, eps, momentum)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                _bn2d(out_channels, eps, momentum),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(Backbone):
    """IResNet-<depth>: float [N, 3, 112, 112] -> embeddings [N, embedding_size]."""

    layer1: nn.Sequential  # the four stages, set by name in __init__ (their names are the checkpoint keys)
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        depth: int,
        embedding_size: int = 512,
        dropout: float = 0.0,
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        if depth not in IRESNET_UNITS:
            raise ValueError(f"IResNet depth {depth} is not one of {sorted(IRESNET_UNITS)}")
        self.network_name = f"iresnet{depth}"
        self.embedding_size = int(embedding_size)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = _bn2d(64, bn_eps, bn_momentum)
        self.prelu = nn.PReLU(64)
        in_channels = 64
        for index, (units, channels) in enumerate(zip(IRESNET_UNITS[depth], STAGE_CHANNELS, strict=False), start=1):
            stage = [IResidualUnit(in_channels, channels, 2, bn_eps, bn_momentum)]
            stage += [IResidualUnit(channels, channels, 1, bn_eps, bn_momentum) for _ in range(units - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*stage))
            in_channels = channels
        self.bn2 = _bn2d(512, bn_eps, bn_momentum)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * 7 * 7, self.embedding_size)
        self.features = ScalelessBatchNorm1d(self.embedding_size, eps=bn_eps, momentum=bn_momentum)
        init_conv_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.network_name)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))
