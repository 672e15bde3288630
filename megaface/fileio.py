"""Atomic file output: a reader sees the old file or the complete new one, never a partial write.

Everything megaface writes for others to read (checkpoints, backbone files, packs, conversions, ONNX
models) goes through these two context managers; a crash or an exception leaves no temporary behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:  # small marker files ('latest') must survive a power loss along with the rename
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; rename it to `path` only if the block succeeds.

    Refuses an existing `path`: an output directory is never overwritten.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another output (-o) or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text so that readers see either the old or the new content, never a partial file."""
    with atomic_output_file(path, fsync=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through `atomic_output_file`."""
    import torch

    with atomic_output_file(path) as tmp:
        torch.save(obj, tmp)
