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
from tests.support.insightface_reference import EPS, IRESNET, MBF, _bn_f, layout, mbf_forward, random_state


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ---- arcface_torch layouts, from the description ------------------------------------------------------


# ---- functional forward passes, from the description --------------------------------------------------


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
