"""Output faults: a full disk (file-size limit), umask modes, a failed ONNX check, OS/YAML/pickle errors.

A failure must leave the previous output intact, no temporary behind, one line on stderr and exit status 1.
The file-size limit (RLIMIT_FSIZE, i.e. `ulimit -f`) makes writes fail with EFBIG like a full disk would
(Python ignores SIGXFSZ, so the write raises instead of killing the process).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from megaface import cli
from megaface.data import PackWriter, encode_jpeg, save_bin
from megaface.fileio import atomic_output_dir, atomic_output_file
from tests.support.fault_fixtures import PROGRESS

ROOT = Path(__file__).resolve().parents[2]


def _megaface(args: list[str], limit_bytes: int) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "megaface", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, preexec_fn=limit, timeout=300, check=False)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    assert result.returncode == 1, result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if not PROGRESS.match(ln)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"megaface {command}: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/<identity>/*.jpg (2 x 3 images) and a pairs list."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for k in range(6):
        (root / f"id{k // 3}").mkdir(exist_ok=True)
        (root / f"id{k // 3}" / f"{k}.jpg").write_bytes(encode_jpeg(rng.integers(0, 255, (112, 112, 3),
                                                                                 dtype=np.uint8)))
    (root / "pairs.txt").write_text("id0/0.jpg id0/1.jpg 1\nid0/2.jpg id1/3.jpg 0\nid1/4.jpg id1/5.jpg 1\n")
    return root


def test_pack_bin_and_rec_under_file_size_limit(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "lfw.bin").write_bytes(b"previous")
    before = _snapshot(out)
    result = _megaface(["pack", "bin", "--pairs", str(images / "pairs.txt"), "--images", str(images),
                        "--output", str(out / "lfw.bin"), "--force"], limit_bytes=4096)
    line = _one_error_line(result, "pack")
    assert f"({out / 'lfw.bin'})" in line and "[EFBIG]" in line and "ulimit -f" in line
    assert _snapshot(out) == before and sorted(os.listdir(out)) == ["lfw.bin"]  # no temporary left
    result = _megaface(["pack", "rec", "--images", str(images), "--output", str(out / "pack")], limit_bytes=8192)
    line = _one_error_line(result, "pack")
    assert f"({out / 'pack'})" in line and "[EFBIG]" in line
    assert sorted(os.listdir(out)) == ["lfw.bin"]


def test_pack_synthetic_under_file_size_limit(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    out.mkdir()
    (out / "val.bin").write_bytes(b"previous")
    result = _megaface(["pack", "synthetic", "--output", str(out), "--identities", "2",
                        "--images-per-identity", "2", "--val-pairs", "2", "--force"], limit_bytes=2048)
    line = _one_error_line(result, "pack")
    assert "[EFBIG]" in line and str(out) in line
    assert sorted(os.listdir(tmp_path)) == ["syn"]  # no hidden temporary directory beside it
    assert _snapshot(out) == {"val.bin": b"previous"}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from megaface.models import build_model

    root = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    torch.save(build_model("mobilefacenet_tiny").state_dict(), root / "backbone.pt")
    (root / "backbone.pt.json").write_text(json.dumps({"network": "mobilefacenet_tiny", "embedding_size": 128}))
    return root / "backbone.pt"


def test_embed_under_file_size_limit(images: Path, backbone: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    out.mkdir()
    for name in ("faces.npy", "faces.labels.npy", "faces.paths.txt"):
        (out / name).write_bytes(b"previous " + name.encode())
    before = _snapshot(out)
    # 6 x 128 float32 = 3 KB of embeddings plus the .npy header: over a 2 KB limit
    result = _megaface(["embed", "--checkpoint", str(backbone), "--images", str(images),
                        "--output", str(out / "faces.npy")], limit_bytes=2048)
    line = _one_error_line(result, "embed")
    assert f"({out / 'faces.npy'})" in line and "[EFBIG]" in line
    assert _snapshot(out) == before  # the whole set is untouched, no temporaries


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with atomic_output_file(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_output_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_bytes(b"x")
        save_bin(tmp_path / "v.bin", [b"a", b"b"], [True])
        with PackWriter(tmp_path / "pack") as writer:
            writer.add(0, encode_jpeg(np.zeros((112, 112, 3), np.uint8)))
    finally:
        os.umask(old)
    mode = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("a.bin", "d", "v.bin", "pack")}
    assert mode == {"a.bin": 0o640, "d": 0o750, "v.bin": 0o640, "pack": 0o750}
    assert os.stat(tmp_path / "pack" / "train.rec").st_mode & 0o777 == 0o640


def test_failed_onnx_check_leaves_no_file_and_large_outputs_pass(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import torch

    from megaface.convert.onnx_export import export_onnx, verify_onnx
    from megaface.models import build_model

    class Scaled(torch.nn.Module):  # un-normalized embeddings of a trained iresnet reach ~1e4
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_model("mobilefacenet_tiny")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 1e4

    torch.manual_seed(0)
    model = Scaled().eval()
    export_onnx(model, tmp_path / "big.onnx", verify=True)
    with pytest.raises(ValueError, match="differs"):  # what an absolute 1e-4 alone made of a correct export
        verify_onnx(model, tmp_path / "big.onnx", atol=1e-4, rtol=0.0)
    (tmp_path / "m.onnx").write_bytes(b"previous")
    with pytest.raises(ValueError, match=r"m\.onnx: ONNX output differs from torch"):
        export_onnx(model, tmp_path / "m.onnx", verify=True, atol=-1e9)  # a check that cannot pass
    assert (tmp_path / "m.onnx").read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "m.onnx"]


def _raise(err: BaseException):
    def command(argv: list[str]) -> int:
        raise err
    return command


@pytest.mark.parametrize("err, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/out.npy"),
     "cannot access (/data/out.npy): permission denied [EACCES]; check the permissions"),
    (OSError(errno.ENOSPC, "No space left on device", "/ckpt/step_1"),
     "cannot write (/ckpt/step_1): no space left on the device [ENOSPC] ("),  # then the free space
    (pickle.UnpicklingError("invalid load key, 'x'."), "cannot unpickle a file: invalid load key"),
])
def test_os_and_pickle_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                           err: BaseException, expected: str) -> None:
    import megaface.data.cli as pack_cli

    monkeypatch.setattr(pack_cli, "main", _raise(err))
    assert cli.main(["pack", "bin"]) == 1
    text = capsys.readouterr().err
    assert text.startswith(f"megaface pack: error: {expected}") and text.count("\n") == 1


def test_yaml_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  max_steps: 5\n  output_dir: [a\n")
    assert cli.main(["train", "--config", str(config)]) == 1
    text = capsys.readouterr().err
    assert text.startswith(f"megaface train: error: cannot parse YAML ({config}, line 4") and text.count("\n") == 1
    with pytest.raises(yaml.YAMLError):  # MEGAFACE_TRACEBACK=1 keeps the traceback for debugging
        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setenv("MEGAFACE_TRACEBACK", "1")
        try:
            cli.main(["train", "--config", str(config)])
        finally:
            monkeypatch.undo()
