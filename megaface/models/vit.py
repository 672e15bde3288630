"""Vision Transformers for faces: arcface_torch's ``vit_t`` / ``vit_s`` / ``vit_b`` / ``vit_l`` / ``vit_h``.

Data path (N images, P = 144 patches, C = embed dim, D = embedding size):

    image [N, 3, 112, 112] -> patch_embed (conv 9x9 stride 9; 112 -> 12x12, the last 4 pixels unused)
      -> tokens [N, P, C] + pos_embed [1, P, C]
      -> (train mode, mask_ratio r > 0) keep int(P*(1-r)) random tokens per sample [N, K, C]
      -> depth x Block: x + drop_path(attn(norm1(x))); x + drop_path(mlp(norm2(x)))
      -> norm (LayerNorm; float32 under autocast)
      -> (masked) the dropped positions are filled with mask_token [1, 1, C], original order restored [N, P, C]
      -> flatten [N, P*C] -> feature: Linear(P*C -> C, no bias), BN(C), Linear(C -> D, no bias), BN(D) -> [N, D]

Attention has no qkv bias (its projection has one), 8 heads in every size, MLP ratio 4 with ReLU6, LayerNorm
eps 1e-5, feature BatchNorm eps 2e-5. Stochastic depth grows linearly from 0 (first block) to
``drop_path_rate`` (last block). Masking and drop path act only in train mode; eval is deterministic.

Module names and state-dict keys are arcface_torch's (``patch_embed.proj``, ``blocks.<i>.attn.qkv``,
``feature.0`` ...), so its checkpoints load key for key (docs/insightface_mapping.md). arcface_torch computes
the attention product in float32 under autocast; here it runs through ``scaled_dot_product_attention`` in the
activations' dtype (bf16 under autocast): softmax is computed in float32 inside the fused kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Backbone, check_input

IMAGE_SIZE = 112
PATCH_SIZE = 9
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144
FEATURE_BN_EPS = 2e-5


@dataclass(frozen=True)
class ViTSpec:
    """embed_dim C, depth (blocks), heads, and the arcface_torch defaults of drop path / mask ratio /
    activation checkpointing for that size (its WebFace42M variants: ``vit_t_dp005_mask0``,
    ``vit_b_dp005_mask_005``, ``vit_l_dp005_mask_005``, ``vit_h``; vit_s as its ``vit_s``)."""

    embed_dim: int
    depth: int
    num_heads: int
    drop_path_rate: float
    mask_ratio: float
    checkpointing: bool
    mlp_ratio: float = 4.0


VIT_SPECS: dict[str, ViTSpec] = {
    "vit_t": ViTSpec(256, 12, 8, 0.05, 0.0, False),
    "vit_s": ViTSpec(512, 12, 8, 0.1, 0.1, False),
    "vit_b": ViTSpec(512, 24, 8, 0.05, 0.05, True),
    "vit_l": ViTSpec(768, 24, 8, 0.05, 0.05, True),
    "vit_h": ViTSpec(1024, 48, 8, 0.1, 0.0, True),
}


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability `rate`, scale the rest
    by 1/(1-rate) so the expectation is unchanged. x [N, ...]."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class Attention(nn.Module):
    """Multi-head self-attention: x [N, T, C] -> [N, T, C]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N, H, T, C/H]
        return self.proj(out.transpose(1, 2).reshape(n, t, c))

    def matmul_madds(self, inputs: tuple, output: torch.Tensor) -> int:
        """Per-sample MAdds of the two attention products (not modules, so profile.py asks for them):
        Q K^T is H * T * T * C/H and attn V the same, 2 * T^2 * C in all (arcface_torch's extra_gflops)."""
        _, t, c = output.shape
        return 2 * t * t * c


class Mlp(nn.Module):
    """fc1 (C -> ratio*C) -> ReLU6 -> fc2 (-> C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = float(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    """Conv 9x9 stride 9: [N, 3, 112, 112] -> tokens [N, 144, C] (row-major over the 12x12 grid)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(Backbone):
    """arcface_torch-layout ViT: float [N, 3, 112, 112] -> embeddings [N, embedding_size].

    drop_path_rate / mask_ratio: None = the size's arcface_torch default (VIT_SPECS).
    checkpointing: recompute each block in backward (torch.utils.checkpoint, non-reentrant; RNG state is
        preserved so drop path draws the same samples); train mode only. None = the size's default.
    """

    def __init__(self, name: str, spec: ViTSpec, embedding_size: int = 512, drop_path_rate: float | None = None,
                 mask_ratio: float | None = None, checkpointing: bool | None = None) -> None:
        super().__init__()
        self.network_name = name
        self.embedding_size = int(embedding_size)
        self.embed_dim = dim = spec.embed_dim
        self.drop_path_rate = spec.drop_path_rate if drop_path_rate is None else float(drop_path_rate)
        self.mask_ratio = spec.mask_ratio if mask_ratio is None else float(mask_ratio)
        self.checkpointing = spec.checkpointing if checkpointing is None else bool(checkpointing)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"{name}: drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if not 0.0 <= self.mask_ratio < 1.0 or int(NUM_PATCHES * (1.0 - self.mask_ratio)) < 1:
            raise ValueError(f"{name}: mask_ratio={self.mask_ratio} must be in [0, 1) and keep at least one "
                             f"of the {NUM_PATCHES} patches")
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PATCHES, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        step = self.drop_path_rate / max(spec.depth - 1, 1)  # linear 0 -> rate (python floats: meta-safe)
        rates = [i * step for i in range(spec.depth)]
        self.blocks = nn.ModuleList(Block(dim, spec.num_heads, spec.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * NUM_PATCHES, dim, bias=False),
            nn.BatchNorm1d(dim, eps=FEATURE_BN_EPS),
            nn.Linear(dim, self.embedding_size, bias=False),
            nn.BatchNorm1d(self.embedding_size, eps=FEATURE_BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch's init: truncated normal(0.02) for linears and pos_embed, normal(0.02) for the mask
        # token, LayerNorm identity; the patch conv and BatchNorms keep PyTorch's defaults.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep int(P*(1-r)) random tokens per sample: [N, P, C] -> ([N, K, C], kept indices [N, K])."""
        if not self.training or self.mask_ratio == 0.0:
            return x, None
        n, p, c = x.shape
        keep = int(p * (1.0 - self.mask_ratio))
        kept = torch.rand(n, p, device=x.device).argsort(dim=1)[:, :keep]
        return x.gather(1, kept.unsqueeze(-1).expand(n, keep, c)), kept

    def _unmask(self, x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        """Put the K processed tokens back at their positions, mask_token elsewhere: -> [N, P, C]."""
        if kept is None:
            return x
        n, _, c = x.shape
        full = self.mask_token.to(x.dtype).expand(n, NUM_PATCHES, c)
        return full.scatter(1, kept.unsqueeze(-1).expand(-1, -1, c), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.network_name)
        tokens, kept = self._mask(self.patch_embed(x) + self.pos_embed)
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        tokens = self._unmask(self.norm(tokens), kept)
        return self.feature(tokens.flatten(1))
