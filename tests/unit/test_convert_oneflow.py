"""OneFlow snapshot import/export, checked against a numpy forward with OneFlow's 'same' padding rule.

The snapshot fixture is written here from the format description (one directory per variable, raw float32
`out`, optional text `meta`), with variable names made by the naming rule (MXNet name, last '_' -> '-',
PReLU slopes '-alpha' of shape [C, 1, 1], '-moving_variance', no scale on fc1), not by megaface's code.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megaface.checkpoint import load_backbone, read_backbone_file, save_backbone_file
from megaface.checkpoint.fc7_shards import load_checkpoint_shards, merge_shards
from megaface.convert.cli import main as convert_main
from megaface.convert.insightface_graph import symbol_json
from megaface.convert.oneflow import export_oneflow, import_oneflow
from megaface.models import build_model
from tests.support.mxnet_reference import conv2d, init_params, run_symbol


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _oneflow_name(name: str, prelus: set[str]) -> str | None:
    for mx, of in (("_moving_var", "-moving_variance"), ("_moving_mean", "-moving_mean")):
        if name.endswith(mx):
            return name[: -len(mx)] + of
    if name == "fc1_gamma":
        return None  # OneFlow's fc1 BatchNorm has scale=False: no gamma variable
    layer, suffix = name.rsplit("_", 1)
    return f"{layer}-alpha" if layer in prelus else f"{layer}-{suffix}"


def _write_var(root, name: str, value: np.ndarray, with_meta: bool, dtype="<f4", data_type="kFloat") -> None:
    (root / name).mkdir(parents=True)
    (root / name / "out").write_bytes(np.ascontiguousarray(value, dtype).tobytes())
    if with_meta:
        dims = "".join(f"  dim: {d}\n" for d in value.shape)
        (root / name / "meta").write_text(f"shape {{\n{dims}}}\ndata_type: {data_type}\n")


def _snapshot(tmp_path, network: str, dim: int, fc7_rows: int = 0):
    symbol = json.loads(symbol_json(network, dim))
    params = init_params(symbol, np.random.default_rng(5))
    prelus = {n["name"] for n in symbol["nodes"] if n["op"] == "LeakyReLU"}
    root = tmp_path / "snapshot_12"
    for i, (name, value) in enumerate(sorted(params.items())):
        of = _oneflow_name(name, prelus)
        if of is None:
            continue
        if of.endswith("-alpha"):
            value = value.reshape(-1, 1, 1)
        _write_var(root, of, value, with_meta=i % 2 == 0)  # older OneFlow wrote no meta
        if of.endswith("-weight") and i % 3 == 0:
            _write_var(root, f"{of}-momentum", np.zeros_like(value), with_meta=False)
    _write_var(root, "System-Train-TrainStep-TrainNet", np.array([1200]), True, "<i8", "kInt64")
    rng = np.random.default_rng(6)
    fc7 = rng.normal(size=(fc7_rows, dim)).astype(np.float32)
    if fc7_rows:
        _write_var(root, "fc7-weight", fc7, with_meta=False)
        _write_var(root, "fc7-weight-momentum", fc7 * 0.5, with_meta=True)
    return root, symbol, params, fc7


def _embed(path, images: np.ndarray) -> np.ndarray:
    model, meta = load_backbone(path)
    assert meta["normalize"] == "oneflow" and meta["build_options"] == {}
    with torch.no_grad():
        return model(torch.from_numpy((images - 127.5) / 128.0).float()).double().numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _images() -> np.ndarray:
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 255, (2, 3, 14, 14)).repeat(8, axis=2).repeat(8, axis=3)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).round()


def test_same_lower_padding_equals_symmetric_padding_on_even_sizes():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3))
    for size in (112, 56, 28, 14):
        x = rng.normal(size=(1, 3, size, size))
        torch_out = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=1)
        lower = conv2d(x, w, 2, (1, 0, 1, 0), 1)  # OneFlow SAME_LOWER: total 1, before the data
        upper = conv2d(x, w, 2, (0, 1, 0, 1), 1)
        assert np.allclose(lower, torch_out.numpy(), atol=1e-10)
        assert not np.allclose(upper, torch_out.numpy(), atol=1e-3)


@pytest.mark.parametrize("network,dim", [
    ("mobilefacenet", 128), pytest.param("iresnet18", 512, marks=pytest.mark.slow)])
def test_import_matches_oneflow_forward(tmp_path, network, dim):
    root, symbol, params, _ = _snapshot(tmp_path, network, dim)
    report = import_oneflow(root, tmp_path / "b.safetensors", network)
    assert "folded pre_fc1" in report or network != "mobilefacenet"
    images = _images()
    ours = _embed(tmp_path / "b.safetensors", images)
    reference = run_symbol(symbol, params, images, same_padding="lower")
    assert _cos(reference, ours).min() >= 0.9999
    # the check can fail: TF-style SAME_UPPER padding is a different network
    upper = run_symbol(symbol, params, images, same_padding="upper")
    assert _cos(upper, ours).min() < 0.999


def test_fc7_becomes_a_shard_set_and_optimizer_state_is_skipped(tmp_path, capsys):
    root, _, _, fc7 = _snapshot(tmp_path, "mobilefacenet", 128, fc7_rows=10)
    assert convert_main(["import-oneflow", str(root), "--network", "mobilefacenet", "-o", str(tmp_path / "y1.pt"),
                         "--num-classes", "9"]) == 0
    assert "9 classes x 128 + momentum, 1 padding rows dropped" in capsys.readouterr().out
    states, _ = load_checkpoint_shards(tmp_path / "y1_fc7")
    merged = merge_shards(states)
    assert torch.equal(merged["weight"], torch.from_numpy(fc7[:9]))
    assert torch.equal(merged["momentum"], torch.from_numpy(fc7[:9] * 0.5))
    assert convert_main(["fc7", str(tmp_path / "y1_fc7"), "--reshard", "2", "-o", str(tmp_path / "w2")]) == 0
    assert sorted(p.name for p in (tmp_path / "w2" / "fc7").iterdir()) == [
        "shard_00000_of_00002.pt", "shard_00001_of_00002.pt"]


@pytest.mark.parametrize("network", ["mobilefacenet", pytest.param("iresnet50", marks=pytest.mark.slow),
                                     pytest.param("iresnet100", marks=pytest.mark.slow)])
def test_export_import_round_trip(tmp_path, network):
    model = build_model(network).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(0.1, 0.4)
    save_backbone_file(tmp_path / "src.pt", model.state_dict(), {"network": network})
    export_oneflow(tmp_path / "src.pt", tmp_path / "snap")
    alpha = tmp_path / "snap" / "relu0-alpha" if network != "mobilefacenet" else tmp_path / "snap" / "conv_1_relu-alpha"
    assert "dim: 1\n  dim: 1" in (alpha / "meta").read_text()
    assert not (tmp_path / "snap" / "fc1-gamma").exists()
    import_oneflow(tmp_path / "snap", tmp_path / "back.pt", network)
    back, _ = read_backbone_file(tmp_path / "back.pt")
    assert back.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


# ---- errors -------------------------------------------------------------------------------------------------

def test_truncated_variable_names_the_file(tmp_path):
    root, _, _, _ = _snapshot(tmp_path, "mobilefacenet", 128)
    out = root / "conv_6sep_conv2d-weight" / "out"
    out.write_bytes(out.read_bytes()[:-12])
    with pytest.raises(ValueError) as err:
        import_oneflow(root, tmp_path / "b.pt", "mobilefacenet")
    assert "conv_6sep_conv2d-weight" in str(err.value)
    assert not (tmp_path / "b.pt").exists()


def test_missing_extra_and_wrong_network(tmp_path):
    root, _, _, _ = _snapshot(tmp_path, "mobilefacenet", 128)
    (root / "res_4_block3_conv_dw_relu-alpha" / "out").unlink()
    with pytest.raises(FileNotFoundError, match="res_4_block3_conv_dw_relu-alpha/out does not exist"):
        import_oneflow(root, tmp_path / "b.pt", "mobilefacenet")
    for name in ("res_4_block3_conv_dw_relu-alpha",):
        (root / name / "meta").unlink(missing_ok=True)
        (root / name).rmdir()
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['res_4_block3_conv_dw_relu-alpha'\]\)"):
        import_oneflow(root, tmp_path / "b.pt", "mobilefacenet")
    _write_var(root, "res_4_block3_conv_dw_relu-alpha", np.ones((256, 1, 1)), True)
    _write_var(root, "stray-weight", np.ones(3), True)
    with pytest.raises(ValueError, match=r"1 extra \(e.g. \['stray-weight'\]\)"):
        import_oneflow(root, tmp_path / "b.pt", "mobilefacenet")
    with pytest.raises(ValueError, match="do not fit iresnet50: .* missing .* extra"):
        import_oneflow(root, tmp_path / "b.pt", "iresnet50")
    with pytest.raises(ValueError, match="'resnet100' has no InsightFace MXNet/OneFlow counterpart"):
        import_oneflow(root, tmp_path / "b.pt", "resnet100")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        import_oneflow(tmp_path / "nope", tmp_path / "b.pt", "mobilefacenet")


def test_meta_shape_mismatch(tmp_path):
    root, _, _, _ = _snapshot(tmp_path, "mobilefacenet", 128)
    var = root / "conv_1_conv2d-weight"
    (var / "meta").write_text("shape {\n  dim: 64\n  dim: 27\n}\ndata_type: kFloat\n")
    with pytest.raises(ValueError, match=r"conv_1_conv2d-weight: \[64, 27\], expected \[64, 3, 3, 3\]"):
        import_oneflow(root, tmp_path / "b.pt", "mobilefacenet")
