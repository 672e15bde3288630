"""File handling shared by the convert subcommands: locating a checkpoint, reading torch files with errors
that name the file, and writing outputs atomically (a failed conversion never leaves a partial output)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megaface.checkpoint import find_checkpoint, read_meta
from megaface.fileio import atomic_output_dir, atomic_output_file  # noqa: F401  (re-exported)

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
