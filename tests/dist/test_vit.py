"""ViT backbones: shapes and cost against arcface_torch's table, masking, drop path, checkpointing, training.

Published figures: InsightFace arcface_torch README, "ViT For Face Recognition" table, FLOPs column (ptflops
multiply-accumulates plus the attention products the networks report as extra_gflops): ViT-T 1.5 G,
ViT-S 5.7 G, ViT-B 11.4 G, ViT-L 25.3 G. ViT-H is not in the table.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaface.models import VIT_SPECS, VisionTransformer, ViTSpec, build_model, profile_model
from megaface.models.vit import NUM_PATCHES, drop_path

# name -> (params, MAdds per sample) of this implementation, pinned: a shape change breaks checkpoints.
MEASURED = {
    "vit_t": (19_137_792, 1_504_882_688),
    "vit_s": (76_023_296, 5_746_548_736),
    "vit_b": (113_833_472, 11_437_170_688),
    "vit_l": (255_684_352, 25_337_794_560),
    "vit_h": (756_393_984, 89_198_870_528),
}
PUBLISHED_MADDS = {"vit_t": 1.5e9, "vit_s": 5.7e9, "vit_b": 11.4e9, "vit_l": 25.3e9}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _on_meta(name: str, **options):
    # Shapes only: the meta device allocates nothing, so even vit_l profiles in a second or two.
    with torch.device("meta"):
        return build_model(name, **options)


def _tiny(**options) -> VisionTransformer:
    # The vit_t code path at C = 32, 2 blocks, 4 heads: behaviour tests in well under a second each.
    return VisionTransformer("vit_t", ViTSpec(32, 2, 4, 0.0, 0.0, False), 16, **options)


@pytest.mark.parametrize("name", [n for n in MEASURED if n != "vit_h"]
                         + [pytest.param("vit_h", marks=pytest.mark.slow)])
def test_size_and_cost(name):
    model = _on_meta(name)
    prof = profile_model(model)
    assert (prof.params, prof.madds) == MEASURED[name]
    if name in PUBLISHED_MADDS:
        assert prof.madds == pytest.approx(PUBLISHED_MADDS[name], rel=0.01)
    spec = VIT_SPECS[name]
    assert len(model.blocks) == spec.depth and model.pos_embed.shape == (1, NUM_PATCHES, spec.embed_dim)
    # The attention products are counted (2 * T^2 * C per block), besides the qkv / proj linears.
    assert prof.madds_by_layer["blocks.0.attn"] == 2 * NUM_PATCHES ** 2 * spec.embed_dim
    assert prof.madds_by_layer["blocks.0.attn.qkv"] == NUM_PATCHES * spec.embed_dim * 3 * spec.embed_dim


def test_layout_keys_are_arcface_torch_names():
    keys = set(_on_meta("vit_t").state_dict())
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "mask_token",
                "blocks.11.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "feature.0.weight",
                "feature.1.running_var", "feature.2.weight", "feature.3.bias"):
        assert key in keys, key
    assert "blocks.0.attn.qkv.bias" not in keys and "feature.0.bias" not in keys


def test_attention_equals_explicit_softmax():
    attn = _tiny().blocks[0].attn
    x = torch.randn(2, 10, 32)
    n, t, c, h = 2, 10, 32, 4
    q, k, v = attn.qkv(x).reshape(n, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
    probs = (q @ k.transpose(-2, -1) * (c // h) ** -0.5).softmax(-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(n, t, c))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_eval_is_deterministic_and_train_is_stochastic():
    model = _tiny(drop_path_rate=0.5, mask_ratio=0.25)
    x = torch.randn(2, 3, 112, 112)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_masking_fills_dropped_patches_with_the_mask_token():
    model = _tiny(mask_ratio=0.5).train()
    seen = []
    model.feature[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    model(torch.randn(3, 3, 112, 112))
    tokens = seen[0].reshape(3, NUM_PATCHES, -1)
    is_mask = (tokens == model.mask_token.detach()).all(dim=-1)
    assert is_mask.sum(dim=1).tolist() == [NUM_PATCHES - int(NUM_PATCHES * 0.5)] * 3
    assert not torch.equal(is_mask[0], is_mask[1])  # a different random subset per sample
    seen.clear()
    model.eval()(torch.randn(1, 3, 112, 112))
    assert not (seen[0].reshape(NUM_PATCHES, -1) == model.mask_token.detach()[0]).all(dim=-1).any()


def test_drop_path_keeps_the_expectation():
    x = torch.ones(20000, 3)
    out = drop_path(x, 0.3, training=True)
    dropped = (out == 0).all(dim=1).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.02)
    assert out.mean().item() == pytest.approx(1.0, abs=0.03)
    assert torch.equal(drop_path(x, 0.3, training=False), x)


def test_stochastic_depth_rates_grow_linearly():
    rates = [b.drop_path_rate for b in _on_meta("vit_t", drop_path_rate=0.11).blocks]
    assert len(rates) == 12
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.11) and rates == sorted(rates)


def test_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 112, 112)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = _tiny(drop_path_rate=0.3, mask_ratio=0.1, checkpointing=checkpointing).train()
        torch.manual_seed(2)  # the same masks and drop-path draws in both runs
        model(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "vit_t", "bn_eps": 1e-5}, "bn_eps"),
    ({"name": "vit_t", "dropout": 0.1}, "drop_path_rate"),
    ({"name": "vit_t", "mask_ratio": 1.0}, "mask_ratio"),
    ({"name": "vit_t", "drop_path_rate": -0.1}, "drop_path_rate"),
    ({"name": "iresnet18", "mask_ratio": 0.1}, "mask_ratio"),
])
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


@pytest.mark.slow
def test_vit_t_learns_on_two_ranks(tmp_path: Path) -> None:
    # The small synthetic set seen repeatedly: the global-batch loss of vit_t must fall on 2 gloo ranks.
    import deepspeed  # noqa: F401  - imported before forking, as in test_train

    from tests.conftest import run_distributed
    from tests.conftest import tiny_args, train_worker

    easy = ("--model.network=vit_t", "--model.embedding_size=128", "--head.margin=[1, 0, 0]", "--head.scale=8",
            "--data.synthetic.identities=8", "--data.synthetic.images_per_identity=2", "--optim.lr=0.05",
            "--model.mask_ratio=0", "--model.drop_path_rate=0")
    # about 1 image/s per rank on a shared CPU: allow minutes, not the default 2
    results = run_distributed(train_worker, 2, tiny_args(tmp_path / "cache", tmp_path / "run", 12, *easy),
                              timeout=900.0)
    assert [r["code"] for r in results] == [0, 0]
    losses = results[0]["losses"]
    assert results[1]["losses"] == losses
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
