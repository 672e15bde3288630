"""The on-disk checkpoint layout: every directory and file name, `latest`, meta.json and discovery.

This module owns the format; the trainer writes through it (`megaface.train.checkpointing`) and eval,
convert and export read through it. Under `OUTPUT/checkpoints/`:

    latest                      text: the newest complete tag (rewritten atomically after a save)
    step_00001000/              one complete checkpoint (renamed from step_00001000.tmp/ when complete)
        meta.json               format megaface.checkpoint.v1: iteration, network, embedding_size, num_classes,
                                world_size, class_ranges, zero_stage, precision, parallel, normalize,
                                config, ds_config, megaface version
        ds/                     DeepSpeed engine.save_checkpoint(..., tag="ds") (backbone [+ data-parallel FC7])
        fc7/shard_00000_of_00002.pt   model-parallel FC7 rows + optimizer state (`megaface.checkpoint.fc7_shards`)
        trainer/rank_00000.pt   loader position, RNG states, counters, lr schedule state
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "megaface.checkpoint.v1"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TAG_PREFIX = "step_"
META_FILE = "meta.json"
DS_DIR = "ds"            # also the DeepSpeed tag: engine.save_checkpoint(tag_dir, tag=DS_DIR)
FC7_DIR = "fc7"
TRAINER_DIR = "trainer"


def tag_for(iteration: int) -> str:
    return f"{TAG_PREFIX}{iteration:08d}"


def trainer_file_name(rank: int) -> str:
    """The file of rank `rank`'s trainer state (loader position, RNG, counters) under TRAINER_DIR."""
    return f"rank_{rank:05d}.pt"


# ---- checkpoint discovery ---------------------------------------------------------------------------------

def _is_tag_dir(path: Path) -> bool:
    return (path / META_FILE).is_file() and not path.name.endswith(".tmp")


def find_checkpoint(path_or_latest: str | os.PathLike | None, output_dir: str | os.PathLike | None = None) -> Path:
    """Resolve 'latest' (under output_dir), an output dir, a checkpoints dir or a tag dir to a complete tag dir."""
    if path_or_latest in (None, "", LATEST):
        if output_dir is None:
            raise ValueError("resume 'latest' needs the run's output directory (--output DIR)")
        return _latest_in(Path(output_dir) / CHECKPOINTS_DIR)
    path = Path(path_or_latest)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_file():
        from megaface.checkpoint.filetype import describe_file

        raise ValueError(f"{path} is {describe_file(path)}, not a checkpoint: expected a directory (an output "
                         "dir, its checkpoints/ dir or a step_NNNNNNNN tag dir)")
    if _is_tag_dir(path):
        return path
    if path.name.endswith(".tmp"):
        raise ValueError(f"{path} is an incomplete checkpoint (a save was interrupted); use the one in 'latest'")
    if (path / CHECKPOINTS_DIR).is_dir():
        return _latest_in(path / CHECKPOINTS_DIR)
    return _latest_in(path)


def _latest_in(ckpt_dir: Path) -> Path:
    marker = ckpt_dir / LATEST
    if marker.is_file():
        tag = marker.read_text(encoding="utf-8").strip()
        if Path(tag).name != tag or tag in ("", ".", ".."):
            raise ValueError(f"{marker} names {tag!r}, which is not a checkpoint of this run (it must be one "
                             f"{TAG_PREFIX}NNNNNNNN name inside {ckpt_dir}); the file was edited or copied from "
                             f"another run: write the newest tag into it, or delete it to use the newest {TAG_PREFIX}*")
        if _is_tag_dir(ckpt_dir / tag):
            return _inside(ckpt_dir / tag, ckpt_dir)
    # no (or a stale) marker: fall back to the newest complete tag directory
    tags = sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if _is_tag_dir(p)) if ckpt_dir.is_dir() else []
    if not tags:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir} (expected '{LATEST}' or "
                                f"{TAG_PREFIX}NNNNNNNN/meta.json)")
    return _inside(tags[-1], ckpt_dir)


def _inside(tag_dir: Path, ckpt_dir: Path) -> Path:
    """`tag_dir`, refused when it resolves (through a symlink) outside the checkpoints directory given."""
    real, root = tag_dir.resolve(), ckpt_dir.resolve()
    if not real.is_relative_to(root):
        raise ValueError(f"{tag_dir} resolves to {real}, outside {ckpt_dir}: a checkpoint of another run or "
                         f"disk; give that checkpoint's own path explicitly, or replace the link by a copy")
    return tag_dir


def read_meta(tag_dir: str | os.PathLike) -> dict[str, Any]:
    meta_path = Path(tag_dir) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: {tag_dir} is not a megaface checkpoint")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return meta

# ---- reading files ------------------------------------------------------------------------------------

def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """An output dir, a checkpoints dir or a tag dir -> the complete tag dir it names."""
    return find_checkpoint(Path(path))  # a file is refused there, naming what it is


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
