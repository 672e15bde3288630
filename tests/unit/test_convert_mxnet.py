"""InsightFace MXNet model-zoo import/export, checked against an independent numpy forward of the symbol."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from megaface.checkpoint import load_backbone, read_backbone_file, save_backbone_file
from megaface.convert.cli import main as convert_main
from megaface.convert.insightface_graph import symbol_json
from megaface.convert.mxnet import export_mxnet, import_mxnet, model_files
from megaface.convert.mxnet_params import pack_params, read_params, write_params
from megaface.models import build_model
from tests.support.mxnet_reference import init_params, pack_list, run_symbol

AUX = ("_moving_mean", "_moving_var")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _named(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{'aux' if k.endswith(AUX) else 'arg'}:{k}": v for k, v in params.items()}


def _fixture(tmp_path, network: str, dim: int, seed: int = 0, packer: str = "writer"):
    """A model-zoo style PREFIX with random params; returns (prefix, symbol dict, params)."""
    symbol = json.loads(symbol_json(network, dim))
    params = init_params(symbol, np.random.default_rng(seed))
    prefix = tmp_path / "zoo" / "model"
    sym_path, params_path = model_files(prefix, 0)
    sym_path.parent.mkdir(parents=True, exist_ok=True)
    sym_path.write_text(json.dumps(symbol))
    if packer == "writer":
        write_params(params_path, _named(params))
    else:  # the test's own struct packer; some arrays in the older v1 / legacy encodings
        named = _named(params)
        versions = {"arg:conv_1_conv2d_weight": "v1", "aux:fc1_moving_mean": "legacy", "arg:pre_fc1_bias": "v1"}
        params_path.write_bytes(pack_list(named, versions))
    return prefix, symbol, params


def _images(n: int = 2, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish RGB 0..255 images: low-frequency noise upsampled, plus detail
    base = rng.uniform(0, 255, (n, 3, 14, 14)).repeat(8, axis=2).repeat(8, axis=3)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).round()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _megaface_embed(path, images: np.ndarray) -> np.ndarray:
    model, meta = load_backbone(path)
    assert meta["normalize"] == "oneflow"  # (x - 127.5) / 128, what the symbol does inside
    with torch.no_grad():
        return model(torch.from_numpy((images - 127.5) / 128.0).float()).double().numpy()


@pytest.mark.parametrize("network,dim,packer", [("mobilefacenet", 128, "struct"), ("iresnet18", 512, "writer")])
def test_import_matches_symbol_forward(tmp_path, network, dim, packer):
    prefix, symbol, params = _fixture(tmp_path, network, dim, packer=packer)
    assert not np.allclose(params["fc1_gamma"], 1) and np.abs(params["pre_fc1_bias"]).max() > 0.01
    import_mxnet(prefix, tmp_path / "b.safetensors", network)
    images = _images()
    reference = run_symbol(symbol, params, images)
    ours = _megaface_embed(tmp_path / "b.safetensors", images)
    assert reference.shape == ours.shape == (2, dim)
    assert _cosines(reference, ours).min() >= 0.9999
    assert np.abs(reference - ours).max() < 1e-3 * np.abs(reference).max()


def test_reference_detects_an_ignored_fix_gamma(tmp_path):
    """The check can fail: honouring fc1's stored gamma (which MXNet ignores) changes the embedding."""
    prefix, symbol, params = _fixture(tmp_path, "mobilefacenet", 128)
    import_mxnet(prefix, tmp_path / "b.pt", "mobilefacenet")
    for node in symbol["nodes"]:
        if node["name"] == "fc1":
            node["attrs"]["fix_gamma"] = "False"
    images = _images()
    wrong = run_symbol(symbol, params, images)
    assert np.abs(wrong - _megaface_embed(tmp_path / "b.pt", images)).max() > 1e-2


def test_writer_bytes_equal_struct_packing_and_reader_reads_old_versions(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {"arg:a_weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
              "aux:b_moving_var": rng.uniform(size=(5,)).astype(np.float32),
              "arg:c": rng.normal(size=(2, 2)).astype(np.float64)}
    assert pack_params(arrays) == pack_list(arrays).replace(struct.pack("<ii", 2, 1), struct.pack("<ii", 1, 0))
    for version in ("v1", "legacy"):
        path = tmp_path / f"{version}.params"
        path.write_bytes(pack_list(arrays, dict.fromkeys(arrays, version)))
        back = read_params(path)
        assert list(back) == list(arrays)
        for key, value in arrays.items():
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value)


@pytest.mark.parametrize("network", ["mobilefacenet", "iresnet50"])
def test_export_import_round_trip(tmp_path, network):
    model = build_model(network).eval()
    with torch.no_grad():  # non-trivial statistics so the round trip is tested on real values
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    save_backbone_file(tmp_path / "src.pt", model.state_dict(), {"network": network})
    export_mxnet(tmp_path / "src.pt", tmp_path / "out" / "model", epoch=3)
    assert (tmp_path / "out" / "model-0003.params").is_file()
    import_mxnet(tmp_path / "out" / "model", tmp_path / "back.pt", network, epoch=3)
    back, meta = read_backbone_file(tmp_path / "back.pt")
    assert meta["build_options"] == {} and back.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():  # equal weights + equal build options: the same network
        assert torch.equal(back[key], value), key


@pytest.mark.slow
def test_export_import_round_trip_iresnet100(tmp_path):
    test_export_import_round_trip(tmp_path, "iresnet100")


def test_export_keeps_bn_eps_of_an_arcface_torch_import(tmp_path):
    model = build_model("mobilefacenet", bn_eps=1e-5).eval()
    save_backbone_file(tmp_path / "src.pt", model.state_dict(),
                       {"network": "mobilefacenet", "build_options": {"bn_eps": 1e-5}})
    export_mxnet(tmp_path / "src.pt", tmp_path / "m")
    symbol = json.loads((tmp_path / "m-symbol.json").read_text())
    assert {n["attrs"]["eps"] for n in symbol["nodes"] if n["op"] == "BatchNorm"} == {"1e-05"}
    import_mxnet(tmp_path / "m", tmp_path / "back.pt", "mobilefacenet")
    back, meta = load_backbone(tmp_path / "back.pt")
    assert meta["build_options"] == {"bn_eps": 1e-5}
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(model(x), back(x), atol=1e-6)


def test_symbol_matches_insightface_names_and_geometry():
    """Spot checks written from InsightFace's fmobilefacenet.py / fresnet.py (names, strides, defaults)."""
    y1 = {n["name"]: n for n in json.loads(symbol_json("mobilefacenet", 128))["nodes"]}
    assert y1["conv_1_conv2d"]["attrs"]["stride"] == "(2, 2)" and y1["conv_1_conv2d"]["attrs"]["pad"] == "(1, 1)"
    assert y1["dconv_23_conv_dw_conv2d"]["attrs"]["num_group"] == "128"
    assert y1["res_5_block1_conv_proj_conv2d"]["attrs"]["num_filter"] == "128"
    assert "eps" not in y1["conv_6dw7_7_batchnorm"]["attrs"]  # MXNet's default 1e-3
    assert y1["fc1"]["attrs"] == {"fix_gamma": "True", "momentum": "0.9", "eps": "2e-05"}
    assert "res_5_block2_conv_sep_conv2d" not in y1 and "conv_6sep_relu_gamma" in y1
    r50 = {n["name"]: n for n in json.loads(symbol_json("iresnet50", 512))["nodes"]}
    assert r50["stage1_unit1_conv2"]["attrs"]["stride"] == "(2, 2)"
    assert r50["stage1_unit1_conv1sc"]["attrs"]["kernel"] == "(1, 1)" and "stage3_unit14_bn3" in r50
    assert "stage3_unit15_bn1" not in r50 and r50["pre_fc1"]["attrs"]["num_hidden"] == "512"


# ---- errors -------------------------------------------------------------------------------------------------

def _rewrite(prefix, mutate):
    _, params_path = model_files(prefix, 0)
    arrays = read_params(params_path)
    mutate(arrays)
    write_params(params_path, arrays)
    return params_path


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.pop("arg:res_3_block2_conv_dw_relu_gamma"), "1 missing (e.g. ['res_3_block2_conv_dw_relu_gamma'"),
    (lambda a: a.update({"arg:extra_weight": np.zeros(3, np.float32)}), "1 extra (e.g. ['extra_weight']"),
    (lambda a: a.update({"arg:conv_6sep_conv2d_weight": np.zeros((512, 128, 3, 3), np.float32)}),
     "conv_6sep_conv2d_weight: [512, 128, 3, 3], expected [512, 128, 1, 1]"),
])
def test_parameter_errors_name_file_and_key(tmp_path, mutate, message):
    prefix, _, _ = _fixture(tmp_path, "mobilefacenet", 128)
    params_path = _rewrite(prefix, mutate)
    with pytest.raises(ValueError) as err:
        import_mxnet(prefix, tmp_path / "b.pt", "mobilefacenet")
    assert str(params_path) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "b.pt").exists()


def test_truncated_and_foreign_files(tmp_path):
    prefix, _, _ = _fixture(tmp_path, "mobilefacenet", 128)
    _, params_path = model_files(prefix, 0)
    data = params_path.read_bytes()
    params_path.write_bytes(data[:1000])
    with pytest.raises(ValueError, match=r"model-0000.params: truncated at byte \d+: array #\d+ data"):
        import_mxnet(prefix, tmp_path / "b.pt", "mobilefacenet")
    params_path.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="byte 0: list magic .* not an MXNet .params file"):
        read_params(params_path)
    with pytest.raises(FileNotFoundError, match="model-0007.params does not exist"):
        import_mxnet(prefix, tmp_path / "b.pt", "mobilefacenet", epoch=7)


def test_wrong_network_and_symbol_geometry(tmp_path):
    prefix, symbol, _ = _fixture(tmp_path, "mobilefacenet", 128)
    with pytest.raises(ValueError, match="'iresnet51' has no InsightFace MXNet/OneFlow counterpart"):
        import_mxnet(prefix, tmp_path / "b.pt", "iresnet51")
    with pytest.raises(ValueError, match="model-symbol.json: layer 'conv0' is missing, expected Convolution"):
        import_mxnet(prefix, tmp_path / "b.pt", "iresnet18")
    for node in symbol["nodes"]:
        if node["name"] == "dconv_34_conv_dw_conv2d":
            node["attrs"]["stride"] = "(1, 1)"
    model_files(prefix, 0)[0].write_text(json.dumps(symbol))
    with pytest.raises(ValueError, match="layer 'dconv_34_conv_dw_conv2d' has stride=\\(1, 1\\)"):
        import_mxnet(prefix, tmp_path / "b.pt", "mobilefacenet")


def test_cli_import_export_and_error_status(tmp_path, capsys):
    prefix, _, _ = _fixture(tmp_path, "mobilefacenet", 128)
    assert convert_main(["import-mxnet", str(prefix), "--network", "mobilefacenet", "-o",
                         str(tmp_path / "y1.safetensors")]) == 0
    assert convert_main(["export-mxnet", str(tmp_path / "y1.safetensors"), "-o", str(tmp_path / "e" / "m"),
                         "--epoch", "1"]) == 0
    assert (tmp_path / "e" / "m-symbol.json").is_file() and (tmp_path / "e" / "m-0001.params").is_file()
    from megaface.cli import main as megaface_main

    assert megaface_main(["convert", "import-mxnet", str(prefix), "--network", "iresnet50", "-o",
                          str(tmp_path / "x.pt")]) == 2
    assert "megaface convert import-mxnet: error:" in capsys.readouterr().err
