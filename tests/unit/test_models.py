"""Backbones: shapes, options, and size/cost against published figures.

Published figures and their sources:
- MobileFaceNet "y1": 0.99 M parameters, 221 M MAdds at 112x112 -- Chen et al., "MobileFaceNets: Efficient
  CNNs for Accurate Real-Time Face Verification on Mobile Devices", CCBR 2018 (arXiv:1804.07573), Table 2.
  Our count is 1.003 M: 0.976 M conv/linear weights + 19.5 k BatchNorm affine + 7.6 k PReLU slopes; the
  paper's 0.99 M matches weights + BatchNorm (PReLU slopes seemingly left out). MAdds match exactly
  (221.0 M, conv/linear only, the embedding linear 512 -> 128 included).
  Cross-check: OpenVINO Open Model Zoo "face-recognition-mobilefacenet-arcface" (the MXNet InsightFace
  model): 0.993 MParams.
- arcface_torch's README names its mbf "mobilefacenet-0.45G". Not asserted: 0.45 G fits both y1 counted
  in FLOPs (2 x 221 M) and the current scale-2 mbf (our mobilefacenet_wide) counted in MAdds (437.5 M), so
  it cannot tell them apart. (y1 with a 512-d embedding has 1.20 M parameters.)
- IResNet MAdds: r18 2.6 G, r50 6.3 G, r100 12.1 G, r200 23.5 G -- InsightFace arcface_torch README,
  "ViT For Face Recognition" table, FLOPs column (measured with ptflops, i.e. multiply-accumulates).
- IResNet-100 parameters 65.132 M, 24.2115 GFLOPs (= 2 x 12.1 G MAdds) -- OpenVINO Open Model Zoo,
  "face-recognition-resnet100-arcface-onnx" specification (the InsightFace MXNet LResNet100E-IR).
- IResNet-50 parameters 43.6 M -- InsightFace model zoo figure for R50 (512-d "E" head).
"""
from __future__ import annotations

import pytest
import torch

from megaface.models import build_model, default_embedding_size, list_models, profile_model
from megaface.models.profile import count_parameters

EXPECTED_NAMES = {
    "mobilefacenet", "mobilefacenet_wide", "mobilefacenet_large", "mobilefacenet_tiny",
    "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200",
}

# name -> (published params or None, published MAdds or None, relative tolerance)
PUBLISHED = {
    "mobilefacenet": (0.99e6, 221e6, 0.015),
    "iresnet18": (None, 2.6e9, 0.01),
    "iresnet34": (None, None, 0.0),
    "iresnet50": (43.6e6, 6.3e9, 0.01),
    "iresnet100": (65.132e6, 12.1e9, 0.01),
    "iresnet200": (None, 23.5e9, 0.01),
}
# Exact counts of this implementation (params, MAdds per sample), pinned so that any change to a network's
# shape -- which would break checkpoints and the arcface_torch key mapping -- fails loudly.
MEASURED = {
    "mobilefacenet": (1_003_008, 220_965_376),
    "mobilefacenet_wide": (2_059_008, 437_520_896),
    "mobilefacenet_large": (6_314_368, 1_816_482_816),
    "mobilefacenet_tiny": (141_792, 23_766_016),
    "iresnet18": (24_025_088, 2_609_954_816),
    "iresnet34": (34_138_816, 4_459_642_880),
    "iresnet50": (43_590_336, 6_309_330_944),
    "iresnet100": (65_155_648, 12_089_606_144),
    "iresnet200": (118_833_408, 23_418_945_536),
}
IRESNET_UNITS = {"iresnet18": [2, 2, 2, 2], "iresnet34": [3, 4, 6, 3], "iresnet50": [3, 4, 14, 3],
                 "iresnet100": [3, 13, 30, 3], "iresnet200": [6, 26, 60, 6]}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def test_registry_names_and_defaults():
    assert EXPECTED_NAMES <= set(list_models())
    assert default_embedding_size("mobilefacenet") == 128
    assert default_embedding_size("mobilefacenet_tiny") == 128
    assert default_embedding_size("mobilefacenet_wide") == 512
    assert default_embedding_size("iresnet100") == 512


def _check_published(name, model):
    prof = profile_model(model)
    assert (prof.params, prof.madds) == MEASURED[name]
    params, madds, tol = PUBLISHED.get(name, (None, None, 0.0))
    if madds is not None:
        assert prof.madds == pytest.approx(madds, rel=tol), f"{name}: {prof.madds / 1e6:.1f} M MAdds"
    if params is not None:
        assert prof.params == pytest.approx(params, rel=tol), f"{name}: {prof.params / 1e6:.4f} M params"


@pytest.mark.parametrize("name", ["mobilefacenet", "mobilefacenet_wide", "mobilefacenet_large", "mobilefacenet_tiny"])
def test_mobilefacenet_size_and_cost(name):
    _check_published(name, build_model(name))


@pytest.mark.parametrize("name", sorted(IRESNET_UNITS))
def test_iresnet_structure_cost_and_shape(name):
    # One build per depth (initialising IResNet-200 alone takes seconds on a busy CPU).
    model = build_model(name)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == IRESNET_UNITS[name]
    assert model.fc.in_features == 512 * 7 * 7
    _check_published(name, model)
    _check_forward(model, name, batch=1)


def test_mobilefacenet_tiny_is_small():
    prof = profile_model(build_model("mobilefacenet_tiny"))
    assert prof.madds <= 25e6 and prof.params <= 0.2e6


def _check_forward(model, name: str, batch: int) -> None:
    # Eval mode, batch 1: even IResNet-200 stays around a second on one CPU thread.
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, 112, 112))
    assert out.shape == (batch, default_embedding_size(name))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.network_name == name and model.embedding_size == default_embedding_size(name)


@pytest.mark.parametrize("name", ["mobilefacenet", "mobilefacenet_wide", "mobilefacenet_tiny", "iresnet18"])
def test_forward_shape_train_mode(name):
    # Train mode needs batch > 1 for BatchNorm1d; a backward pass must reach the stem.
    model = build_model(name)
    out = model(torch.randn(2, 3, 112, 112))
    out.square().mean().backward()
    first = next(model.parameters())
    assert out.shape == (2, default_embedding_size(name)) and first.grad is not None


def test_mobilefacenet_large_forward_eval():
    _check_forward(build_model("mobilefacenet_large"), "mobilefacenet_large", batch=1)


def test_seed_head_details():
    r100 = build_model("iresnet100")
    assert r100.dropout.p == pytest.approx(0.4)
    assert build_model("iresnet18").dropout.p == 0.0
    assert build_model("iresnet18", dropout=0.3).dropout.p == pytest.approx(0.3)
    assert r100.bn1.eps == pytest.approx(2e-5) and r100.bn1.momentum == pytest.approx(0.1)
    # Final BatchNorm without scale: gamma is a buffer of ones, never a trainable parameter.
    names = {n for n, _ in r100.named_parameters()}
    assert "features.weight" not in names and "features.bias" in names
    assert torch.equal(r100.state_dict()["features.weight"], torch.ones(512))
    del r100
    mbf = build_model("mobilefacenet")
    assert mbf.layers[0].layers[1].eps == pytest.approx(1e-3)
    assert isinstance(mbf.layers[0].layers[2], torch.nn.PReLU)
    assert "features.layers.3.weight" not in {n for n, _ in mbf.named_parameters()}
    assert mbf.layers[1].layers[0].groups == 64  # y1: depthwise conv after the stem


def test_embedding_size_and_options():
    model = build_model("mobilefacenet_tiny", embedding_size=64, bn_eps=1e-5)
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 64) and model.embedding_size == 64
    assert build_model("iresnet18", embedding_size=256).fc.out_features == 256


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet100"}, "iresnet100"),
        ({"name": "iresnet18", "embedding_size": 0}, "embedding_size"),
        ({"name": "iresnet18", "dropout": 1.5}, "dropout"),
        ({"name": "mobilefacenet", "dropout": 0.2}, "no dropout"),
        ({"name": "iresnet18", "width": 2}, "width"),
        ({"name": "iresnet18", "bn_eps": -1.0}, "bn_eps"),
    ],
)
def test_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(**kwargs)


def test_bad_input_shape_names_expected_shape():
    model = build_model("mobilefacenet_tiny").eval()
    with pytest.raises(ValueError, match=r"\[N, 3, 112, 112\]"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))


def test_profile_restores_mode_and_counts_trainable():
    model = build_model("mobilefacenet_tiny").train()
    prof = profile_model(model)
    assert model.training
    assert prof.trainable == prof.params == count_parameters(model)
    assert prof.gflops == pytest.approx(2 * prof.madds / 1e9)
