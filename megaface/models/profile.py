"""Parameter and multiply-add counting for backbones (used by tests and benchmarks).

Multiply-adds (MAdds) are counted the way the MobileFaceNet/MobileNet papers and most model zoos count
them: one per weight use in Conv2d and Linear layers (a fused multiply-add = 1 MAdd = 2 FLOPs).
BatchNorm, LayerNorm, PReLU/ReLU6, softmax, additions and bias terms are not counted (BatchNorm folds into the
convs at deployment). Each conv contributes ``out_elements * in_channels / groups * kernel_h * kernel_w``.

Products that are not modules (the attention products Q K^T and attn V of a ViT, computed inside
``scaled_dot_product_attention``) are counted by the module that computes them: any module with a
``matmul_madds(inputs, output) -> int`` method (per sample) adds that many under its own name (the attention's
``qkv``/``proj`` linears are counted separately as Linear layers). ViT counts therefore equal ptflops' module
counts plus arcface_torch's ``extra_gflops`` (2 * T^2 * C per block).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelProfile:
    """params: all parameters; trainable: those with requires_grad; madds: per sample;
    madds_by_layer: per-sample MAdds keyed by module name (Conv2d/Linear, and modules with matmul_madds)."""

    params: int
    trainable: int
    madds: int
    madds_by_layer: dict[str, int]

    @property
    def gflops(self) -> float:
        """FLOPs (2 per MAdd) per sample, in units of 1e9."""
        return 2.0 * self.madds / 1e9


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BatchNorm statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _layer_madds(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    per_sample_out = output.numel() // output.shape[0]
    matmul_madds = getattr(module, "matmul_madds", None)
    if matmul_madds is not None:
        return int(matmul_madds(inputs, output))
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample_out * (module.in_channels // module.groups) * kh * kw
    # nn.Linear: every output element is a dot product over in_features.
    return per_sample_out * int(getattr(module, "in_features"))  # noqa: B009


def count_madds(model: nn.Module, input_size: tuple[int, int, int] = (3, 112, 112)) -> dict[str, int]:
    """Per-sample MAdds of each Conv2d/Linear/matmul_madds module, from one eval-mode forward of a batch of 1.

    The model's training mode is restored afterwards; the input follows the model's device and dtype.
    """
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) or hasattr(module, "matmul_madds"):
            def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor, key: str = name) -> None:
                counts[key] = counts.get(key, 0) + _layer_madds(mod, inputs, output)
            handles.append(module.register_forward_hook(hook))
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counts


def profile_model(model: nn.Module, input_size: tuple[int, int, int] = (3, 112, 112)) -> ModelProfile:
    """Parameters and per-sample multiply-adds of ``model`` at ``input_size`` (C, H, W)."""
    by_layer = count_madds(model, input_size)
    return ModelProfile(
        params=count_parameters(model),
        trainable=count_parameters(model, trainable_only=True),
        madds=sum(by_layer.values()),
        madds_by_layer=by_layer,
    )
