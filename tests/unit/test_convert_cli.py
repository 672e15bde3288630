"""`megaface convert` command-line wiring that needs no training run: InsightFace interop both ways, ONNX
export + onnxruntime check, argument errors. (Checkpoint subcommands: tests/e2e/test_convert_train.py.)"""

from __future__ import annotations

import pytest
import torch

from megaface.checkpoint import read_backbone_file, save_backbone_file
from megaface.cli import main as megaface_main
from megaface.models import build_model


@pytest.fixture(scope="module")
def mobilefacenet_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("mobilefacenet")
    path = tmp_path_factory.mktemp("mbf") / "backbone.pt"
    save_backbone_file(path, model.state_dict(), {"network": "mobilefacenet", "embedding_size": 128,
                                                  "normalize": "arcface_torch"})
    return path, model.state_dict()


def test_insightface_round_trip(mobilefacenet_file, tmp_path, capsys):
    path, original = mobilefacenet_file
    arcface = tmp_path / "arcface_mbf.pth"
    assert megaface_main(["convert", "export-insightface", str(path), "-o", str(arcface)]) == 0
    assert "wrote arcface_torch mobilefacenet" in capsys.readouterr().out
    exported = torch.load(arcface, weights_only=True)
    back = tmp_path / "back.safetensors"
    assert megaface_main(["convert", "import-insightface", str(arcface), "-o", str(back)]) == 0  # network detected
    assert "wrote megaface backbone" in capsys.readouterr().out
    state, meta = read_backbone_file(back)
    assert meta["network"] == "mobilefacenet" and meta["source"] == "arcface_torch"
    assert sorted(state) == sorted(original) == sorted(exported)
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_import_insightface_rejects_another_architecture(mobilefacenet_file, tmp_path, capsys):
    path, _ = mobilefacenet_file
    assert megaface_main(["convert", "import-insightface", str(path), "-o", str(tmp_path / "x.pt"), "--network",
                         "iresnet18"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megaface convert import-insightface: error:") and "iresnet18" in err
    assert not (tmp_path / "x.pt").exists()


def test_onnx_export_and_verify(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_backbone_file(path, build_model("mobilefacenet_tiny").state_dict(), {"network": "mobilefacenet_tiny"})
    out = tmp_path / "tiny.onnx"
    assert megaface_main(["convert", "onnx", str(path), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "opset 17" in text and "onnxruntime matches torch" in text
    import onnx

    graph = onnx.load(str(out))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert megaface_main(["convert", "onnx", str(path), "-o", str(tmp_path / "old.onnx"), "--opset", "13"]) == 2
    assert "opset 17 or newer" in capsys.readouterr().err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        megaface_main(["convert", "fc7", "somewhere"])  # neither --merge nor --reshard
    assert exit_info.value.code == 2
    assert "one of the arguments --merge --reshard is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        megaface_main(["convert", "consolidate", "somewhere"])  # no -o
    assert "-o/--output" in capsys.readouterr().err
    assert megaface_main(["convert", "fc7", "/nonexistent/run", "--merge", "-o", "x.pt"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        megaface_main(["convert", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name in ("inspect", "consolidate", "fc7", "onnx", "import-insightface", "export-insightface"):
        assert name in help_text
