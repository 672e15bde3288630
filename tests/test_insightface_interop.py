"""InsightFace arcface_torch interop.

The reference layouts below are written from the description in docs/insightface_mapping.md (key names and
shapes of arcface_torch's iresnet and mbf state_dicts), and a small functional forward pass written from the
same description checks that a megaface network computes what those weights mean there -- not only that
the names line up.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaface.convert.insightface import (
    detect_network,
    export_insightface,
    export_insightface_file,
    import_insightface,
    import_insightface_file,
)
from megaface.models import build_model

IRESNET = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
           "iresnet100": (3, 13, 30, 3), "iresnet200": (6, 26, 60, 6)}
# megaface name -> arcface_torch MobileFaceNet(scale, blocks, num_features)
MBF = {"mobilefacenet": (1, (1, 4, 6, 2), 128), "mobilefacenet_wide": (2, (1, 4, 6, 2), 512),
       "mobilefacenet_large": (4, (2, 8, 12, 4), 512)}
EPS = 1e-5  # arcface_torch's BatchNorm eps


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---- arcface_torch layouts, from the description ------------------------------------------------------

def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def iresnet_layout(units, dim):
    shapes = {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64), "prelu.weight": (64,)}
    in_c = 64
    for stage, (count, c) in enumerate(zip(units, (64, 128, 256, 512)), start=1):
        for i in range(count):
            p = f"layer{stage}.{i}"
            shapes.update(_bn(f"{p}.bn1", in_c))
            shapes[f"{p}.conv1.weight"] = (c, in_c, 3, 3)
            shapes.update(_bn(f"{p}.bn2", c))
            shapes[f"{p}.prelu.weight"] = (c,)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            shapes.update(_bn(f"{p}.bn3", c))
            if i == 0:
                shapes[f"{p}.downsample.0.weight"] = (c, in_c, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", c))
            in_c = c
    shapes.update(_bn("bn2", 512))
    shapes.update({"fc.weight": (dim, 512 * 7 * 7), "fc.bias": (dim,)})
    shapes.update(_bn("features", dim))
    return shapes


def _conv_block(prefix, cin, cout, k, groups=1, act=True):
    shapes = {f"{prefix}.layers.0.weight": (cout, cin // groups, k, k), **_bn(f"{prefix}.layers.1", cout)}
    if act:
        shapes[f"{prefix}.layers.2.weight"] = (cout,)
    return shapes


def _depthwise(prefix, cin, cout, groups):
    return {**_conv_block(f"{prefix}.layers.0", cin, groups, 1),
            **_conv_block(f"{prefix}.layers.1", groups, groups, 3, groups=groups),
            **_conv_block(f"{prefix}.layers.2", groups, cout, 1, act=False)}


def _residual(prefix, c, count, groups):
    shapes = {}
    for j in range(count):
        shapes.update(_depthwise(f"{prefix}.layers.{j}", c, c, groups))
    return shapes


def mbf_layout(scale, blocks, dim):
    c1, c2 = 64 * scale, 128 * scale
    shapes = _conv_block("layers.0", 3, c1, 3)
    if blocks[0] == 1:
        shapes.update(_conv_block("layers.1", c1, c1, 3, groups=64))
    else:
        shapes.update(_residual("layers.1", c1, blocks[0], 128))
    shapes.update({**_depthwise("layers.2", c1, c1, 128), **_residual("layers.3", c1, blocks[1], 128),
                   **_depthwise("layers.4", c1, c2, 256), **_residual("layers.5", c2, blocks[2], 256),
                   **_depthwise("layers.6", c2, c2, 512), **_residual("layers.7", c2, blocks[3], 256),
                   **_conv_block("conv_sep", c2, 512, 1),
                   **_conv_block("features.layers.0", 512, 512, 7, groups=512, act=False),
                   "features.layers.2.weight": (dim, 512), **_bn("features.layers.3", dim)})
    return shapes


def layout(name, dim=None):
    if name in IRESNET:
        return iresnet_layout(IRESNET[name], dim or 512)
    scale, blocks, default = MBF[name]
    return mbf_layout(scale, blocks, dim or default)


def random_state(shapes, seed=0, device="cpu"):
    """Plausible trained weights: He-scaled convs, BatchNorm near identity, positive variances."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if device == "meta":
            state[key] = torch.empty(shape, device="meta", dtype=torch.int64 if shape == () else torch.float32)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000 + seed, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", ".bias")):
            state[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # BatchNorm gamma or PReLU slope
            state[key] = 1.0 + torch.randn(shape, generator=g) * 0.1 if "prelu" not in key and not key.endswith(
                "layers.2.weight") else torch.full(shape, 0.25)
        else:
            fan_in = torch.tensor(shape[1:]).prod().item()
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


# ---- functional forward passes, from the description --------------------------------------------------

def _bn_f(sd, p, x):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        False, 0.0, EPS)


def iresnet_forward(sd, units, x):
    x = F.prelu(_bn_f(sd, "bn1", F.conv2d(x, sd["conv1.weight"], padding=1)), sd["prelu.weight"])
    for stage, count in enumerate(units, start=1):
        for i in range(count):
            p, stride = f"layer{stage}.{i}", 2 if i == 0 else 1
            out = F.conv2d(_bn_f(sd, f"{p}.bn1", x), sd[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(_bn_f(sd, f"{p}.bn2", out), sd[f"{p}.prelu.weight"])
            out = _bn_f(sd, f"{p}.bn3", F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1))
            if i == 0:
                x = _bn_f(sd, f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=2))
            x = out + x
    x = torch.flatten(_bn_f(sd, "bn2", x), 1)
    return _bn_f(sd, "features", F.linear(x, sd["fc.weight"], sd["fc.bias"]))


def _block_f(sd, p, x, stride=1, pad=0, act=True):
    w = sd[f"{p}.layers.0.weight"]
    groups = x.shape[1] // w.shape[1]
    x = _bn_f(sd, f"{p}.layers.1", F.conv2d(x, w, stride=stride, padding=pad, groups=groups))
    return F.prelu(x, sd[f"{p}.layers.2.weight"]) if act else x


def _depthwise_f(sd, p, x, stride, residual):
    y = _block_f(sd, f"{p}.layers.0", x)
    y = _block_f(sd, f"{p}.layers.1", y, stride, 1)
    y = _block_f(sd, f"{p}.layers.2", y, act=False)
    return x + y if residual else y


def mbf_forward(sd, blocks, x):
    x = _block_f(sd, "layers.0", x, 2, 1)
    for index in range(1, 8):
        p = f"layers.{index}"
        if index == 1 and blocks[0] == 1:
            x = _block_f(sd, p, x, 1, 1)
        elif index % 2 == 0:
            x = _depthwise_f(sd, p, x, 2, False)
        else:
            for j in range(blocks[(index - 1) // 2]):
                x = _depthwise_f(sd, f"{p}.layers.{j}", x, 1, True)
    x = _block_f(sd, "features.layers.0", _block_f(sd, "conv_sep", x), act=False)
    x = F.linear(torch.flatten(x, 1), sd["features.layers.2.weight"])
    return _bn_f(sd, "features.layers.3", x)


# ---- tests ---------------------------------------------------------------------------------------------

def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", list(IRESNET) + list(MBF))
def test_megaface_layout_is_arcface_layout(name):
    with torch.device("meta"):
        model = build_model(name)
    assert _shapes(model.state_dict()) == layout(name)
    reference = random_state(layout(name), device="meta")
    assert detect_network(reference) == (name, model.embedding_size)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "mobilefacenet_wide"])
def test_imported_weights_compute_what_they_compute_in_arcface_torch(name):
    reference = random_state(layout(name), seed=1)
    state, report = import_insightface(reference)
    assert report.network == name and report.build_options == {"bn_eps": EPS}
    model = build_model(name, **report.build_options).eval()
    model.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        want = iresnet_forward(reference, IRESNET[name], x) if name in IRESNET else mbf_forward(
            reference, MBF[name][1], x)
        got = model(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet", "mobilefacenet_large"])
def test_round_trips_are_bit_exact(name):
    reference = random_state(layout(name), seed=2)
    back = export_insightface(import_insightface(reference)[0], name)
    assert list(back) == list(reference)
    assert all(torch.equal(back[k], reference[k]) and back[k].dtype == reference[k].dtype for k in reference)

    model = build_model(name).eval()
    original = model.state_dict()
    state, _ = import_insightface(export_insightface(original, name))
    assert all(torch.equal(state[k], original[k]) for k in original) and set(state) == set(original)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    fresh = build_model(name).eval()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert state["features.weight" if name in IRESNET else "features.layers.3.weight"].data_ptr() != \
        original["features.weight" if name in IRESNET else "features.layers.3.weight"].data_ptr()


def test_wrappers_prefixes_and_dtypes_are_handled():
    reference = random_state(layout("mobilefacenet"), seed=3)
    wrapped = {"epoch": 3, "state_dict_backbone": {f"module.{k}": v.half() if v.is_floating_point() else v
                                                   for k, v in reference.items()}}
    state, report = import_insightface(wrapped)
    text = str(report)
    assert "state_dict_backbone" in text and "module." in text and "float16" in text
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert "final BatchNorm scale" in text  # a trained gamma in arcface_torch's mbf is kept, and said so


def test_errors_name_keys_and_cause():
    reference = random_state(layout("iresnet50"), device="meta")
    with pytest.raises(ValueError, match="holds a iresnet50.*not iresnet34"):
        import_insightface(reference, network="iresnet34")
    broken = dict(reference)
    del broken["layer3.13.conv2.weight"]
    broken["layer3.0.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"missing.*layer3\.13\.conv2\.weight.*unexpected.*extra"):
        import_insightface(broken, network="iresnet50")
    wrong_dim = dict(reference, **{"fc.bias": torch.empty(7, device="meta")})
    with pytest.raises(ValueError, match=r"fc\.bias: expected \[512\], got \[7\]"):
        import_insightface(wrong_dim)
    with pytest.raises(ValueError, match="not an arcface_torch iresnet, mbf or vit"):
        import_insightface({"backbone.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="not tensors"):
        import_insightface({"conv1.weight": [1, 2]})
    with pytest.raises(ValueError, match="import_insightface_file"):
        import_insightface("backbone.pth")
    with pytest.raises(ValueError, match="no arcface_torch counterpart"):
        export_insightface(build_model("mobilefacenet_tiny").state_dict(), "mobilefacenet_tiny")


def test_file_helpers_round_trip(tmp_path):
    from megaface.checkpoint import load_backbone

    reference = random_state(layout("iresnet18"), seed=4)
    torch.save({"state_dict_backbone": reference, "epoch": 1}, tmp_path / "checkpoint_gpu_0.pt")
    text = import_insightface_file(tmp_path / "checkpoint_gpu_0.pt", tmp_path / "r18.pt")
    assert "iresnet18" in text
    model, meta = load_backbone(tmp_path / "r18.pt")
    assert model.network_name == "iresnet18" and meta["source"] == "arcface_torch"
    assert meta["build_options"] == {"bn_eps": EPS}
    export_insightface_file(tmp_path / "r18.pt", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert all(torch.equal(back[k], reference[k]) for k in reference) and set(back) == set(reference)


def test_truncated_file_is_reported_and_nothing_written(tmp_path):
    reference = random_state(layout("mobilefacenet"), seed=5)
    torch.save(reference, tmp_path / "mbf.pth")
    data = (tmp_path / "mbf.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pth.*truncated"):
        import_insightface_file(tmp_path / "cut.pth", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        import_insightface_file(tmp_path / "nope.pth", tmp_path / "out.pt")
