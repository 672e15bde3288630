"""ONNX export: dynamic batch, opset 17, fp16, atomic writes, onnxruntime verification."""
from __future__ import annotations

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from megaface.convert import onnx_export  # noqa: E402
from megaface.convert.onnx_export import export_onnx, verify_onnx  # noqa: E402
from megaface.models import build_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _calibrated(name: str) -> nn.Module:
    """A fresh network whose BatchNorm statistics come from data, so eval outputs are O(1).

    With default running statistics (mean 0, var 1) deep networks output values in the thousands in eval
    mode, and an absolute tolerance of 1e-4 would test float32 rounding instead of the export.
    """
    model = build_model(name)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(16, 3, 112, 112) * 2 - 1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _calibrated("mobilefacenet_tiny")


def _input_dims(path):
    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims], graph.input[0].name, graph.output[0].name


def test_tiny_fp32_dynamic_batch_matches_torch(tiny, tmp_path):
    tiny.train()
    out = export_onnx(tiny, tmp_path / "tiny.onnx")
    assert tiny.training, "export must restore the caller's training mode"
    assert out == tmp_path / "tiny.onnx" and [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]
    dims, in_name, out_name = _input_dims(out)
    assert dims == ["batch", 3, 112, 112] and (in_name, out_name) == ("input", "embedding")
    proto = onnx.load(str(out))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) == 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["network"] == "mobilefacenet_tiny" and meta["embedding_size"] == "128"
    err = verify_onnx(tiny, out, atol=1e-4, batch_sizes=(1, 3, 5))
    assert err < 1e-4


def test_mobilefacenet_fp32_matches_torch(tmp_path):
    model = _calibrated("mobilefacenet")
    out = export_onnx(model, tmp_path / "mbf.onnx")
    assert verify_onnx(model, out, atol=1e-4) < 1e-4


def test_fp16_export_runs_in_onnxruntime(tiny, tmp_path):
    out = export_onnx(tiny, tmp_path / "tiny16.onnx", fp16=True)
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert next(tiny.parameters()).dtype == torch.float32, "fp16 export must not cast the caller's model"
    # fp16 carries ~3 significant digits through ~30 layers: compare relative to the output scale.
    err = verify_onnx(tiny, out, atol=2e-2, rtol=2e-2)
    assert 0 < err < 5e-2


def test_static_batch(tiny, tmp_path):
    out = export_onnx(tiny, tmp_path / "static.onnx", dynamic_batch=False)
    assert _input_dims(out)[0] == [2, 3, 112, 112]
    assert verify_onnx(tiny, out) < 1e-4


def test_export_from_backbone_file(tiny, tmp_path):
    from megaface.checkpoint import save_backbone_file

    src = save_backbone_file(tmp_path / "tiny.pt", tiny.state_dict(),
                             {"network": "mobilefacenet_tiny", "embedding_size": 128})
    out = export_onnx(src, tmp_path / "from_file.onnx")
    assert verify_onnx(src, out) < 1e-4 and verify_onnx(tiny, out) < 1e-4


def test_verify_detects_other_weights(tiny, tmp_path):
    out = export_onnx(tiny, tmp_path / "tiny.onnx")
    other = _calibrated("mobilefacenet_tiny")
    with pytest.raises(ValueError, match="differs from torch"):
        verify_onnx(other, out)
    wider = build_model("mobilefacenet_tiny", embedding_size=64).eval()
    with pytest.raises(ValueError, match="output shape"):
        verify_onnx(wider, out)


def test_failed_export_leaves_no_file(tiny, tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("simulated failure after the graph was written")

    monkeypatch.setattr(onnx_export, "_stamp_metadata", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(tiny, tmp_path / "never.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"opset": 11}, ValueError, "opset"),
        ({"exporter": "tensorrt"}, ValueError, "exporter"),
    ],
)
def test_bad_export_arguments(tiny, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export_onnx(tiny, tmp_path / "x.onnx", **kwargs)


def test_missing_paths(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(tiny, tmp_path / "no_such_dir" / "x.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        verify_onnx(tiny, tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="verify_onnx\\(model_or_checkpoint, onnx_path\\)"):
        verify_onnx(tmp_path / "model.onnx", tmp_path / "ckpt")


@pytest.mark.slow
def test_dynamo_exporter_matches_torch(tiny, tmp_path):
    # The torch.export-based exporter needs onnxscript and takes 10-50 s on a CPU: slow-marked.
    pytest.importorskip("onnxscript")
    out = export_onnx(tiny, tmp_path / "dynamo.onnx", exporter="dynamo")
    assert _input_dims(out)[0][1:] == [3, 112, 112]
    assert verify_onnx(tiny, out, batch_sizes=(1, 4)) < 1e-4


@pytest.mark.slow
def test_iresnet18_fp32_matches_torch(tmp_path):
    model = _calibrated("iresnet18")
    out = export_onnx(model, tmp_path / "r18.onnx")
    assert verify_onnx(model, out, atol=1e-4) < 1e-4
