"""File handling shared by the convert subcommands: locating a checkpoint, reading torch files with errors
that name the file, and writing outputs atomically (a failed conversion never leaves a partial output)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from megaface.checkpoint import find_checkpoint, read_meta

__all__ = ["resolve_checkpoint", "load_torch_file", "atomic_output_file", "atomic_output_dir", "read_meta"]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """An output dir, a checkpoints dir or a tag dir -> the complete tag dir it names."""
    path = Path(path)
    if path.is_file():
        raise ValueError(f"{path} is a file; expected a checkpoint directory (an output dir, its checkpoints/ "
                         "dir or a step_NNNNNNNN tag dir)")
    return find_checkpoint(path)


def load_torch_file(path: Path, what: str, weights_only: bool = True, mmap: bool = False) -> Any:
    """torch.load with an error that names the file and says what it should have been.

    DeepSpeed's own files pickle DeepSpeed objects (loss scaler, enums) and need weights_only=False; only
    open checkpoints you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected {what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any reader failure is the same user error: a bad file
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: cannot read {what} ({type(err).__name__}: {detail[:200]}); the file is "
                         "truncated or is not a torch file: copy it again or use another checkpoint") from None


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; rename it to `path` only if the block succeeds.

    Refuses an existing `path`: a conversion never overwrites a checkpoint.
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
