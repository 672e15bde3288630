"""Small building blocks shared by the backbones, and their base class `Backbone`."""
from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """Base of every network :func:`megaface.models.build_model` builds: float [N, 3, 112, 112] -> [N, D]."""

    network_name: str  # its registry name, e.g. "iresnet50" (stored in checkpoint meta)
    embedding_size: int  # D


class ScalelessBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose scale (gamma) is a fixed buffer of ones instead of a parameter.

    The seed's embedding layer is a BatchNorm "without scale" (MXNet fix_gamma / OneFlow scale=False):
    only the shift is learned. Keeping gamma as a *buffer* named ``weight`` means no optimizer, weight
    decay or ZeRO partitioning ever touches it, while the state_dict keeps the usual ``weight`` key so
    checkpoints from trainers that store gamma (arcface_torch) load without renaming. A loaded gamma
    other than one is honoured in forward, so such imports stay exact.
    """

    def __init__(self, num_features: int, eps: float = 2e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        del self.weight
        self.register_buffer("weight", torch.ones(num_features))


def init_conv_weights(module: nn.Module, per_group: bool = True) -> None:
    """He init (fan_out) for conv/linear weights, identity BatchNorm, zero biases.

    The fan is counted per group: ``kaiming_normal_`` ignores groups, which makes depthwise kernels
    (fan_out = k*k, not channels*k*k) hundreds of times too small and fresh networks output ~0 in eval mode.
    ``per_group=False`` reproduces that (arcface_torch's init): behind a BatchNorm the scale does not change the
    output in training mode, but the small kernels take ~channels times larger steps relative to their size.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            groups = m.groups if isinstance(m, nn.Conv2d) and per_group else 1
            fan_out = m.weight.shape[0] // groups * m.weight[0, 0].numel()
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_input(x: torch.Tensor, network_name: str, size: int = 112) -> None:
    """Raise a ValueError naming the shape when the input is not [N, 3, size, size] float."""
    if torch.jit.is_tracing():
        # Traced shapes are tensors; the check would only be frozen into the graph as a constant.
        return
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
        raise ValueError(
            f"{network_name} expects input of shape [N, 3, {size}, {size}], got {list(x.shape)}; "
            f"align and resize faces to {size}x{size} RGB first"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{network_name} expects a floating-point input, got {x.dtype}; "
            "normalize images with megaface.data.normalize_batch first"
        )
