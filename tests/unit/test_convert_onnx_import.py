"""`megaface convert import-onnx` on graphs written by arcface_torch's own torch2onnx.py
(tests/fixtures/interop/arcface_torch, rebuilt by make_arcface_torch.sh), checked against onnxruntime's forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="import-onnx needs the onnx extra (pip install 'megaface[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the reference forward is onnxruntime's (megaface[onnx])")

from megaface.checkpoint import load_backbone  # noqa: E402
from megaface.cli import main as megaface_main  # noqa: E402  (after the importorskip)


def convert(args: list[str]) -> int:
    """`megaface convert ARGS` through the top-level CLI (which prints errors and picks the exit status)."""
    return megaface_main(["convert", *args])


FIXTURES = Path(__file__).parents[1] / "fixtures" / "interop" / "arcface_torch"
MBF = FIXTURES / "mbf.onnx"
R50 = FIXTURES / "large" / "r50.onnx"


def onnxruntime_embeddings(path: Path, images: torch.Tensor) -> torch.Tensor:
    """onnxruntime's output, one image per run (torch2onnx traces at batch 1)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: img[None].numpy()})[0]) for img in images])


def check_import(tmp_path: Path, model_file: Path, network: str) -> None:
    out = tmp_path / "backbone.pt"
    assert convert(["import-onnx", str(model_file), "--network", network, "-o", str(out)]) == 0
    model, meta = load_backbone(out)
    assert model.network_name == network and meta["build_options"] == {"bn_eps": 1e-5}
    images = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        ours = model.eval()(images).double()
    theirs = onnxruntime_embeddings(model_file, images).double()
    cosine = torch.nn.functional.cosine_similarity(ours, theirs)
    assert cosine.min() >= 0.9999, cosine


def test_mbf_from_torch2onnx_matches_onnxruntime(tmp_path: Path) -> None:
    assert MBF.is_file(), f"{MBF} is committed; rebuild it with tests/fixtures/interop/make_arcface_torch.sh"
    check_import(tmp_path, MBF, "mobilefacenet_wide")


@pytest.mark.slow
@pytest.mark.skipif(not R50.is_file(), reason=f"{R50} is not committed (170 MB): run "
                                              "tests/fixtures/interop/make_arcface_torch.sh --large")
def test_r50_from_torch2onnx_matches_onnxruntime(tmp_path: Path) -> None:
    check_import(tmp_path, R50, "iresnet50")


def test_other_network_names_the_first_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert(["import-onnx", str(MBF), "--network", "iresnet50", "-o", str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "node '/layers.0/layers/layers.0/Conv' (Conv) does not match megaface's iresnet50 layer 'conv1'" in err
    assert not (tmp_path / "b.pt").exists()


def test_foreign_op_names_that_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = onnx.load(str(MBF))
    prelus = [n for n in graph.graph.node if n.op_type == "PRelu"]
    victim = prelus[3]
    victim.op_type = "Relu"
    del victim.input[1:]
    edited = tmp_path / "relu.onnx"
    onnx.save(graph, str(edited))
    assert convert(["import-onnx", str(edited), "--network", "mobilefacenet_wide", "-o", str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"node '{victim.name}' (Relu) does not match megaface's mobilefacenet_wide layer" in err, err
    assert len(err.splitlines()) == 1


def test_missing_residual_add_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same layers, one residual Add bypassed: the weights all fit, the wiring does not."""
    graph = onnx.load(str(MBF))
    add = next(n for n in graph.graph.node if n.op_type == "Add")
    for node in graph.graph.node:
        for i, name in enumerate(node.input):
            if name == add.output[0]:
                node.input[i] = add.input[0]
    graph.graph.node.remove(add)
    edited = tmp_path / "noadd.onnx"
    onnx.save(graph, str(edited))
    assert convert(["import-onnx", str(edited), "--network", "mobilefacenet_wide", "-o", str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err
    assert "residual Add nodes, megaface's mobilefacenet_wide has 12" in err, err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert(["import-onnx", str(tmp_path / "none.onnx"), "--network", "iresnet50", "-o",
                 str(tmp_path / "b.pt")]) == 2
    assert "none.onnx does not exist" in capsys.readouterr().err


def test_folded_bias_becomes_identity_batchnorm() -> None:
    from megaface.convert.onnx_import import _identity_bn

    bias = np.array([0.5, -1.0], np.float32)
    state = _identity_bn(bias, 1e-5)
    bn = torch.nn.BatchNorm2d(2, eps=1e-5).eval()
    bn.load_state_dict({**{k: torch.from_numpy(v) for k, v in state.items()}, "num_batches_tracked": torch.tensor(0)})
    x = torch.randn(1, 2, 3, 3)
    assert torch.allclose(bn(x), x + torch.from_numpy(bias)[None, :, None, None], atol=1e-6)
