"""import-mxnet on files MXNet 1.9.1 wrote with InsightFace's own symbol code, against MXNet's own forward.

Opt-in: MEGAFACE_MXNET_PYTHON (a Python with mxnet 1.9.1) runs megaface's export-mxnet output in MXNet.

Fixtures: tests/fixtures/interop (tests/fixtures/interop/make.sh rebuilds them; it needs MXNet, the tests do
not). y1's weights are committed as MXNet wrote them; the fresnets' (r18/r34/r50/r100: sparse ternary weights,
90-250 MB as written) as model-0000.params.xz, decompressed to a temporary directory by params_or_skip. Every
symbol JSON and every reference embedding is committed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from megaface.checkpoint import load_backbone
from megaface.convert.mxnet import export_mxnet, import_mxnet
from megaface.convert.mxnet_ops import OP_DEFAULTS, REQUIRED, node_attrs
from tests.conftest import FIXTURES, MIN_COSINE, MODELS, cosines, megaface_embeddings, params_or_skip

# y1 and r18 by default; the deeper fresnets take 10-60 s each on 2 CPUs
CASES = [pytest.param(n, marks=pytest.mark.slow) if n in ("r34", "r50", "r100") else n for n in MODELS]


@pytest.mark.parametrize("name", CASES)
def test_import_matches_mxnet_forward(tmp_path, name):
    prefix = params_or_skip(name, tmp_path)
    report = import_mxnet(prefix, tmp_path / "b.safetensors", MODELS[name])
    assert "fix_gamma=True" in report and "fc1" in report  # fc1 stores a gamma != 1 that MXNet ignores
    reference = np.load(FIXTURES / name / "embeddings.npy")
    ours = megaface_embeddings(tmp_path / "b.safetensors")
    assert ours.shape == reference.shape
    assert cosines(ours, reference).min() >= MIN_COSINE
    # MXNet's embeddings are not degenerate (a forward collapsed to a constant or to one direction could not
    # fail the cosine check): finite, varying within each vector, and telling the images apart
    assert np.isfinite(reference).all() and (reference.std(axis=1) > 0.1 * np.abs(reference).mean(axis=1)).all()
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert (unit @ unit.T - np.eye(len(unit))).max() < 0.9


def test_fixture_symbols_leave_defaults_out():
    """The committed symbols are MXNet's: fresnet's shortcut convolutions carry no pad/num_group and
    fmobilefacenet's conv BatchNorms no eps; read through the table they are MXNet's defaults."""
    r18 = {n["name"]: n for n in json.loads((FIXTURES / "r18" / "model-symbol.json").read_text())["nodes"]}
    shortcut = r18["stage1_unit1_conv1sc"]
    assert "pad" not in shortcut["attrs"] and "num_group" not in shortcut["attrs"]
    attrs = node_attrs("Convolution", shortcut["attrs"], "r18")
    assert (attrs["pad"], attrs["stride"], attrs["dilate"], attrs["num_group"]) == ((0, 0), (2, 2), (1, 1), 1)
    y1 = {n["name"]: n for n in json.loads((FIXTURES / "y1" / "model-symbol.json").read_text())["nodes"]}
    bn = y1["conv_1_batchnorm"]
    assert "eps" not in bn["attrs"] and node_attrs("BatchNorm", bn["attrs"], "y1")["eps"] == 1e-3
    for name in ("r34", "r50", "r100"):  # every symbol JSON is committed, weights or not
        nodes = json.loads((FIXTURES / name / "model-symbol.json").read_text())["nodes"]
        assert any(n["op"] == "Convolution" and "pad" not in n.get("attrs", {}) for n in nodes)


def _mxnet_default(text: str):
    """MXNet's description 'boolean, optional, default=1' -> its default as a Python value (None: none)."""
    if "required" in text:
        return "required"
    raw = re.search(r"default=(.*)$", text).group(1)
    value, kind = raw.strip("'"), text.split(",")[0]
    if raw == "None" or (value == "None" and kind.endswith("or None")):  # no default ('None' of an enum is one)
        return None
    if kind.startswith("boolean"):
        return value == "1"
    if kind.startswith("Shape"):
        return tuple(int(v) for v in value.strip("[]").split(",") if v)
    if kind.startswith(("int", "long")):
        return int(value)
    if kind.startswith(("float", "double")):
        return float(value)
    return value


def test_default_table_is_mxnets_documentation():
    """OP_DEFAULTS against the operator docs MXNet 1.9.1 itself reports (written by make_mxnet.py)."""
    docs = json.loads((FIXTURES / "mxnet_op_defaults.json").read_text())
    assert docs["mxnet_version"] == "1.9.1"
    assert set(docs["ops"]) == set(OP_DEFAULTS)
    for op, attrs in docs["ops"].items():
        for name, text in attrs.items():
            default = _mxnet_default(text)
            if default == "required":
                assert name in REQUIRED[op], (op, name)
            elif default is None:
                assert name not in OP_DEFAULTS[op], (op, name)
            elif isinstance(default, float):
                assert OP_DEFAULTS[op][name] == pytest.approx(default, rel=1e-6), (op, name)
            else:
                assert OP_DEFAULTS[op][name] == default, (op, name, text)
        assert set(OP_DEFAULTS[op]) | set(REQUIRED.get(op, {})) <= set(attrs), op


def _edited_y1(tmp_path: Path, node: str, drop: str) -> Path:
    """A copy of the MXNet-written y1 with one attribute removed from one node's symbol entry."""
    prefix = tmp_path / "model"
    shutil.copy(FIXTURES / "y1" / "model-0000.params", f"{prefix}-0000.params")
    symbol = json.loads((FIXTURES / "y1" / "model-symbol.json").read_text())
    entry = next(n for n in symbol["nodes"] if n["name"] == node)
    del entry["attrs"][drop]
    Path(f"{prefix}-symbol.json").write_text(json.dumps(symbol))
    return prefix


def test_absent_fix_gamma_means_true(tmp_path):
    """fix_gamma=False removed from a conv BatchNorm: MXNet's default True, so its stored gamma is ignored."""
    prefix = _edited_y1(tmp_path, "conv_1_batchnorm", "fix_gamma")
    import_mxnet(prefix, tmp_path / "b.safetensors", "mobilefacenet")
    model, _ = load_backbone(tmp_path / "b.safetensors")
    assert torch.equal(model.layers[0].layers[1].weight, torch.ones(64))
    control = tmp_path / "control"
    control.mkdir()
    import_mxnet(FIXTURES / "y1" / "model", control / "b.safetensors", "mobilefacenet")
    assert not torch.equal(load_backbone(control / "b.safetensors")[0].layers[0].layers[1].weight, torch.ones(64))


@pytest.mark.parametrize("node, drop, message", [
    ("conv_1_conv2d", "pad", "has pad=(0, 0) (absent: MXNet's default), megaface's mobilefacenet has (1, 1)"),
    ("conv_1_conv2d", "stride", "has stride=(1, 1) (absent: MXNet's default), megaface's mobilefacenet has (2, 2)"),
    ("conv_1_conv2d", "no_bias", "has no_bias=False (absent: MXNet's default)"),
    ("conv_1_relu", "act_type", "has act_type=leaky (absent: MXNet's default), megaface's mobilefacenet has prelu"),
    ("conv_2_dw_conv2d", "num_group", "has num_group=1 (absent: MXNet's default), megaface's mobilefacenet has 64"),
])
def test_absent_attribute_is_the_default_not_unknown(tmp_path, node, drop, message):
    prefix = _edited_y1(tmp_path, node, drop)
    with pytest.raises(ValueError) as err:
        import_mxnet(prefix, tmp_path / "b.safetensors", "mobilefacenet")
    assert message in str(err.value) and "model-symbol.json" in str(err.value)


def test_required_attribute_missing_is_an_error(tmp_path):
    prefix = _edited_y1(tmp_path, "conv_1_conv2d", "kernel")
    with pytest.raises(ValueError, match=r"node 'conv_1_conv2d': Convolution has no 'kernel', which MXNet requires"):
        import_mxnet(prefix, tmp_path / "b.safetensors", "mobilefacenet")


_MXNET_FORWARD = """
import sys, numpy as np, mxnet as mx
prefix, images, out = sys.argv[1:4]
sym, arg, aux = mx.model.load_checkpoint(prefix, 0)
mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
x = np.load(images).astype(np.float32)
mod.bind(data_shapes=[("data", x.shape)], for_training=False)
mod.set_params(arg, aux)
mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
np.save(out, mod.get_outputs()[0].asnumpy())
"""


@pytest.mark.parametrize("name", ["y1", "r18"])
def test_export_mxnet_runs_in_mxnet(tmp_path, name):
    """export-mxnet's symbol + params loaded and run by MXNet itself (opt-in: MEGAFACE_MXNET_PYTHON)."""
    python = os.environ.get("MEGAFACE_MXNET_PYTHON")
    if not python:
        pytest.skip("set MEGAFACE_MXNET_PYTHON to a Python with mxnet 1.9.1 to run megaface's export in MXNet")
    prefix = params_or_skip(name, tmp_path)
    import_mxnet(prefix, tmp_path / "b.safetensors", MODELS[name])
    export_mxnet(tmp_path / "b.safetensors", tmp_path / "exported" / "model")
    script = tmp_path / "forward.py"
    script.write_text(_MXNET_FORWARD)
    subprocess.run([python, str(script), str(tmp_path / "exported" / "model"), str(FIXTURES / "images.npy"),
                    str(tmp_path / "out.npy")], check=True, timeout=240)
    in_mxnet = np.load(tmp_path / "out.npy")
    assert cosines(in_mxnet, megaface_embeddings(tmp_path / "b.safetensors")).min() >= MIN_COSINE
    assert cosines(in_mxnet, np.load(FIXTURES / name / "embeddings.npy")).min() >= MIN_COSINE
