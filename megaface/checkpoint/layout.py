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

and beside it, in OUTPUT/: `best_<pack>.pt` (+ `best_<pack>.pt.json`, the backbone sidecar) and `.megaface.lock`.
DeepSpeed chooses the names inside ds/; the ones the readers rely on are here too (`DS_MODEL_STATES` ...).
Every name and pattern of these files is defined in this module, once; writers, readers, integrity checks
and tests import them.
"""

from __future__ import annotations

import json
import os
import re
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
TMP_SUFFIX = ".tmp"      # a tag directory while it is written (`tmp_tag_name`); never read
LOCK_FILE = ".megaface.lock"   # OUTPUT/.megaface.lock: one trainer per output directory
BEST_PREFIX = "best_"
SIDECAR_SUFFIX = ".json"  # a backbone file's meta: `<file>.json` beside `<file>`

# DeepSpeed's own file names inside ds/ (DeepSpeed 0.19), as the readers expect them
DS_MODEL_STATES = "mp_rank_00_model_states.pt"
"""ZeRO 0-2: the one model-states file ("module", and at stage 0 the optimizer with its fp32 groups)."""
DS_OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
"""ZeRO 1-3: rank R's optimizer partition; group 1 the bf16 prefix, group 2 the rank."""
DS_ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
"""ZeRO 3: rank R's model-states file (one per rank, parameters partitioned); group 1 the rank."""
DS_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_")
"""Any per-rank DeepSpeed file (optimizer partition, ZeRO-3 model states); group 1 the rank that wrote it."""

FC7_SHARD_FILE = re.compile(r"^shard_(\d+)_of_(\d+)\.pt$")
"""An FC7 shard file name (`fc7_shard_file_name`); group 1 the rank, group 2 the world size it was saved at."""
FC7_SHARD_GLOB = "shard_*_of_*.pt"
TRAINER_FILE = re.compile(r"^rank_(\d+)\.pt$")
"""A trainer-state file name (`trainer_file_name`); group 1 the rank."""


def tag_for(iteration: int) -> str:
    """The tag directory name of the checkpoint saved after `iteration` steps (`step_00001000`)."""
    return f"{TAG_PREFIX}{iteration:08d}"


def tmp_tag_name(tag: str) -> str:
    """The name a tag directory has while its ranks write it (renamed to `tag` once complete)."""
    return f"{tag}{TMP_SUFFIX}"


def trainer_file_name(rank: int) -> str:
    """The file of rank `rank`'s trainer state (loader position, RNG, counters) under TRAINER_DIR."""
    return f"rank_{rank:05d}.pt"


def fc7_shard_file_name(rank: int, world_size: int) -> str:
    """The file name of rank `rank`'s FC7 shard (under FC7_DIR) in a checkpoint saved at `world_size` ranks."""
    return f"shard_{rank:05d}_of_{world_size:05d}.pt"


def ds_optim_file_name(rank: int, bf16: bool = False) -> str:
    """DeepSpeed's name of rank `rank`'s ZeRO 1-3 optimizer partition (`bf16_` prefixed under bf16)."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def ds_zero3_model_file_name(rank: int) -> str:
    """DeepSpeed's name of rank `rank`'s ZeRO-3 model-states file."""
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def best_file_name(pack: str) -> str:
    """OUTPUT/best_<pack>.pt: the backbone with the best Accuracy-Flip on validation pack `pack` so far."""
    return f"{BEST_PREFIX}{pack}.pt"


BEST_SIDECAR_GLOB = f"{BEST_PREFIX}*.pt{SIDECAR_SUFFIX}"
"""The sidecars of every best backbone in an output directory (`best_val.pt.json`, ...)."""


def sidecar_path(path: str | os.PathLike) -> Path:
    """The meta sidecar of a backbone file: `<file>.json` beside `<file>`."""
    return Path(f"{path}{SIDECAR_SUFFIX}")


def file_owner_rank(rel_path: str) -> int | None:
    """The rank that wrote a checkpoint file, from its name (`trainer/rank_R.pt`, `fc7/shard_R_of_W.pt`,
    `ds/[bf16_]zero_pp_rank_R_*`); None for a file of no rank (meta.json, DeepSpeed's model states)."""
    name = rel_path.rsplit("/", 1)[-1]
    for pattern in (TRAINER_FILE, FC7_SHARD_FILE, DS_RANK_FILE):
        match = pattern.match(name)
        if match is not None:
            return int(match.group(1))
    return None


# ---- checkpoint discovery ---------------------------------------------------------------------------------

def _is_tag_dir(path: Path) -> bool:
    return (path / META_FILE).is_file() and not path.name.endswith(TMP_SUFFIX)


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
    if path.name.endswith(TMP_SUFFIX):
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
