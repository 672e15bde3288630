"""arcface_torch ViT (and mbf_large) interop: import/export against an independent description of the layout.

`ArcfaceViT` below is written from the description in docs/insightface_mapping.md (arcface_torch's module
names, a 9x9/9 patch conv, pos_embed, pre-norm blocks with an explicit softmax attention without qkv bias, a
ReLU6 MLP, a final LayerNorm and the Linear-BN-Linear-BN feature head); it shares no code with
megaface.models.vit. Weights filled into it must produce the same embeddings once imported into megaface.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from megaface.convert.insightface import detect_network, export_insightface, import_insightface
from megaface.models import VIT_SPECS, build_model
from tests.support.insightface_reference import MBF, layout, mbf_forward, random_state

# megaface name -> arcface_torch get_model name, embed dim, depth (8 heads in every size)
ARCFACE_VITS = {"vit_t": ("vit_t_dp005_mask0", 256, 12), "vit_s": ("vit_s", 512, 12),
                "vit_b": ("vit_b_dp005_mask_005", 512, 24), "vit_l": ("vit_l_dp005_mask_005", 768, 24),
                "vit_h": ("vit_h", 1024, 48)}


class ArcfaceViT(nn.Module):
    """Eval-mode arcface_torch VisionTransformer, from the description (no masking, no drop path)."""

    def __init__(self, dim: int, depth: int, heads: int = 8, features: int = 512) -> None:
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 9, 9)
        self.pos_embed = nn.Parameter(torch.randn(1, 144, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            block.attn = nn.Module()
            block.attn.qkv, block.attn.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
            block.mlp = nn.Module()
            block.mlp.fc1, block.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.blocks.append(block)
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(nn.Linear(144 * dim, dim, bias=False), nn.BatchNorm1d(dim, eps=2e-5),
                                     nn.Linear(dim, features, bias=False), nn.BatchNorm1d(features, eps=2e-5))

    def _attention(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = block.attn.qkv(x).split(c, dim=-1)
        q, k, v = (z.reshape(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        weights = torch.softmax(torch.einsum("nhqd,nhkd->nhqk", q, k) / (c // self.heads) ** 0.5, dim=-1)
        return block.attn.proj(torch.einsum("nhqk,nhkd->nqhd", weights, v).reshape(n, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = x + self._attention(block, block.norm1(x))
            x = x + block.mlp.fc2(torch.clamp(block.mlp.fc1(block.norm2(x)), 0.0, 6.0))
        return self.feature(self.norm(x).flatten(1))


def _trained(model: nn.Module, seed: int) -> nn.Module:
    """Non-default LayerNorm / BatchNorm parameters and statistics, so that a swapped key would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")) or (tensor.dim() == 1 and "weight" in name):
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", list(ARCFACE_VITS))
def test_layout_matches_and_is_detected(name):
    _, dim, depth = ARCFACE_VITS[name]
    with torch.device("meta"):
        reference = ArcfaceViT(dim, depth).state_dict()
        ours = build_model(name).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert detect_network(reference) == (name, 512)
    assert (VIT_SPECS[name].embed_dim, VIT_SPECS[name].depth, VIT_SPECS[name].num_heads) == (dim, depth, 8)


def test_imported_vit_computes_what_arcface_torch_computes():
    torch.manual_seed(0)
    reference = _trained(ArcfaceViT(256, 12, features=128), seed=1)
    state, report = import_insightface(reference.state_dict())
    assert (report.network, report.embedding_size, report.build_options) == ("vit_t", 128, {})
    model = build_model("vit_t", embedding_size=128).eval()
    model.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        want, got = reference(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    back = export_insightface(model.state_dict(), "vit_t")
    assert set(back) == set(reference.state_dict())
    assert all(torch.equal(back[k], v) for k, v in reference.state_dict().items())


def test_unknown_vit_size_is_named():
    with torch.device("meta"):
        odd = ArcfaceViT(256, 3).state_dict()
    with pytest.raises(ValueError, match=r"embed_dim 256 and 3 blocks matches none"):
        import_insightface(odd)


@pytest.mark.slow  # 1.8 GMAC twice, over 20 s on a shared CPU
def test_imported_mbf_large_computes_what_arcface_torch_computes():
    reference = random_state(layout("mobilefacenet_large"), seed=1)
    state, report = import_insightface(reference)
    assert report.network == "mobilefacenet_large"
    model = build_model("mobilefacenet_large", **report.build_options).eval()
    model.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        want, got = mbf_forward(reference, MBF["mobilefacenet_large"][1], x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
