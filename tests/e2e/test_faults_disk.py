"""Full disk, quota and `ulimit -f` while convert consolidate / fc7 / onnx, embed and pack write.

Each case runs the real command in a subprocess under a file-size limit (RLIMIT_FSIZE: writes fail with EFBIG,
as they fail with ENOSPC on a full disk) and checks: exit status 1, one line naming the output path, the free
space and the limit, the previous output untouched and no temporary left beside it. torch.save given a file
name reports such a failure as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`:
`megaface.fileio.torch_save` turns it into the OSError behind it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from megaface import cli, fileio
from tests.support.fault_fixtures import megaface, one_error_line, snapshot, train_checkpoint

LIMIT = 64 * 1024  # the tiny backbone is ~1 MB: every output below is larger


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_checkpoint(tmp_path_factory.mktemp("disk"))


def _outdir(tmp_path: Path, previous: str) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / previous).write_bytes(b"previous")
    return out


def _check_line(line: str, target: Path) -> None:
    assert f"({target})" in line and "[EFBIG]" in line, line
    assert f"free on {target.parent}" in line and "file-size limit 64.0 KB" in line, line
    assert "inline_container" not in line and "unexpected pos" not in line


@pytest.mark.parametrize("name", ["backbone.pt", "backbone.safetensors"])
def test_consolidate_under_file_size_limit(run: Path, tmp_path: Path, name: str) -> None:
    out = _outdir(tmp_path, name)
    result = megaface(["convert", "consolidate", str(run), "-o", str(out / name)], limit_bytes=LIMIT)
    _check_line(one_error_line(result, "convert consolidate", 1), out / name)
    assert snapshot(out) == {name: b"previous"}  # the old file is intact, no .tmp and no sidecar left


def test_fc7_merge_and_reshard_under_file_size_limit(run: Path, tmp_path: Path) -> None:
    out = _outdir(tmp_path, "fc7.pt")
    result = megaface(["convert", "fc7", str(run), "--merge", "-o", str(out / "fc7.pt")], limit_bytes=16 * 1024)
    line = one_error_line(result, "convert fc7", 1)
    assert f"({out / 'fc7.pt'})" in line and "[EFBIG]" in line and "free on" in line
    # the reshard copies the DeepSpeed files first: shutil's copy error used to arrive as a list without errno
    result = megaface(["convert", "fc7", str(run), "--reshard", "2", "-o", str(out / "w2")], limit_bytes=LIMIT)
    _check_line(one_error_line(result, "convert fc7", 1), out / "w2")
    assert snapshot(out) == {"fc7.pt": b"previous"} and sorted(os.listdir(out)) == ["fc7.pt"]


def test_onnx_under_file_size_limit(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    out = _outdir(tmp_path, "model.onnx")
    result = megaface(["convert", "onnx", str(run), "-o", str(out / "model.onnx"), "--no-verify"],
                      limit_bytes=LIMIT)
    _check_line(one_error_line(result, "convert onnx", 1), out / "model.onnx")
    assert snapshot(out) == {"model.onnx": b"previous"} and sorted(os.listdir(out)) == ["model.onnx"]


def test_embed_and_pack_lines_say_the_free_space(run: Path, tmp_path: Path) -> None:
    syn = tmp_path / "syn"
    assert megaface(["pack", "synthetic", "--output", str(syn), "--identities", "4", "--images-per-identity", "2",
                     "--val-pairs", "8"]).returncode == 0
    out = _outdir(tmp_path, "e.npy")
    result = megaface(["embed", "--checkpoint", str(run), "--bin", str(syn / "val.bin"), "--output",
                       str(out / "e.npy")], limit_bytes=2048)
    line = one_error_line(result, "embed", 1)
    assert f"({out / 'e.npy'})" in line and "free on" in line and "file-size limit 2.0 KB" in line
    result = megaface(["pack", "bin", "--pairs", str(syn / "val.bin"), "--output", str(out / "v.bin")],
                      limit_bytes=2048)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert snapshot(out) == {"e.npy": b"previous"}


def test_torch_writer_error_without_errno_is_diagnosed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A path-based torch.save (or a torch that hides the OSError) still becomes ENOSPC naming the path."""
    def failing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 91840 vs 91728")

    class Usage:
        free = 4096

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: Usage())
    target = tmp_path / "b.pt"
    with pytest.raises(OSError) as caught:
        fileio.atomic_torch_save({"w": torch.zeros(3)}, target)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert os.listdir(tmp_path) == []
    line = cli.describe_error(caught.value)
    assert line.startswith(f"cannot write ({target}): no space left on the device [ENOSPC] (") and "free on" in line
