"""Shared pieces of the fault tests: a tiny trained checkpoint, the CLI in a subprocess, snapshots."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

from megaface.data import encode_jpeg
from megaface.data.recordio import RecordWriter, pack_payload
from tests.conftest import ROOT, tiny_args


def megaface(args: list[str], limit_bytes: int | None = None, env: dict[str, str] | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m megaface ARGS` in a fresh process, optionally under a file-size limit (`ulimit -f`)."""
    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
                **(env or {})}
    full_env.pop("MEGAFACE_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "megaface", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, preexec_fn=limit, timeout=timeout, check=False)


def train_checkpoint(root: Path, steps: int = 2) -> Path:
    """A real 1-rank run of `steps` steps with a checkpoint at the end; returns its output directory."""
    out = root / "run"
    result = megaface(["train", *tiny_args(root / "cache", out, steps, "--save-every", str(steps))])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (out / "checkpoints" / "latest").is_file()
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


PROGRESS = re.compile(r"^[\w ]+(: [\w ]+)?: \d+/\d+ \w+, ")  # the plain progress lines of long commands (utils.progress)


def one_error_line(result: subprocess.CompletedProcess, command: str, code: int | None = None) -> str:
    """The single `megaface COMMAND: error: ...` line of stderr (no traceback), checking the exit status."""
    assert result.returncode != 0 if code is None else result.returncode == code, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.strip().splitlines() if ": warning: " not in ln and not PROGRESS.match(ln)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"megaface {command}: error: "), lines[0]
    return lines[0]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def raw_pack(path: Path, labels: list[int], classes: int) -> Path:
    """A header-less RecordIO pack written record by record, so a label may lie outside the property's count."""
    path.mkdir()
    rng = np.random.default_rng(1)
    with RecordWriter(path / "train.rec", path / "train.idx") as writer:
        for key, label in enumerate(labels):
            image = encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
            writer.write(key, pack_payload(float(label), image, id=key))
    (path / "property").write_text(f"{classes},112,112\n")
    return path
