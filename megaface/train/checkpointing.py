"""Save and resume a whole training run (layout in `megaface.checkpoint`).

Atomicity: every rank writes into `<tag>.tmp/`; after a barrier rank 0 writes meta.json, renames the
directory to `<tag>` and only then rewrites `latest`. A crash before the rename leaves a `.tmp` directory
that nothing reads (the next save of that tag removes it) and `latest` still names the previous complete
checkpoint. On several nodes the output directory must be a shared filesystem (as DeepSpeed also assumes).

Resume at another world size: FC7 shards are merged and re-split with `megaface.checkpoint.fc7_shards.reshard`; the
DeepSpeed part loads fully for ZeRO 0 + fp32 (its optimizer state is not partitioned); otherwise only the
backbone weights are loaded (`load_module_only`) and the backbone optimizer (momentum) starts fresh - said
in the log. Loader position and RNG states come from rank 0's file (the data order then differs from an
uninterrupted run at the new world size, which is unavoidable).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import megaface
from megaface.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINTS_DIR, DS_DIR, FC7_DIR, LATEST, META_FILE, TAG_PREFIX,
                                 TRAINER_DIR, read_meta, tag_for, trainer_file_name)
from megaface.fileio import atomic_torch_save, atomic_write_text
from megaface.checkpoint.fc7_shards import load_rank_shard, load_shard_state_dict, shard_file_name, shard_state_dict
from megaface.distributed import comm
from megaface.train.build import TrainParts


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        state["device"] = getattr(torch, accel.current_accelerator().type).get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    accel = getattr(torch, "accelerator", None)
    if "device" in state and accel is not None and accel.is_available():
        getattr(torch, accel.current_accelerator().type).set_rng_state(state["device"])


def save_checkpoint(parts: TrainParts, output_dir: Path, iteration: int, trainer_state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final tag directory."""
    state = parts.state
    ckpt_dir = Path(output_dir) / CHECKPOINTS_DIR
    tag = tag_for(iteration)
    tmp, final = ckpt_dir / f"{tag}.tmp", ckpt_dir / tag
    if state.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted save
        tmp.mkdir(parents=True)
    comm.barrier(state.group)
    parts.engine.save_checkpoint(str(tmp), tag=DS_DIR, save_latest=False)
    (tmp / TRAINER_DIR).mkdir(exist_ok=True)
    if parts.fc7_optimizer is not None:
        (tmp / FC7_DIR).mkdir(exist_ok=True)
        shard = shard_state_dict(parts.head, parts.fc7_optimizer)
        atomic_torch_save(shard, tmp / FC7_DIR / shard_file_name(state.rank, state.world_size))
    atomic_torch_save({**trainer_state, "rng": rng_state()}, tmp / TRAINER_DIR / trainer_file_name(state.rank))
    comm.barrier(state.group)
    if state.is_main:
        full_meta = {"format": CHECKPOINT_FORMAT, "iteration": iteration, "megaface_version": megaface.__version__,
                     **meta}
        atomic_write_text(tmp / META_FILE, json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        if final.exists():  # a save at the same iteration (e.g. resumed at the end): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        _prune(ckpt_dir, keep_last, keep=tag)
    comm.barrier(state.group)
    return final


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in tags[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], tag_dir: Path) -> None:
    """Refuse a checkpoint of another network / class count / head layout before anything is loaded."""
    for key in ("network", "embedding_size", "num_classes", "parallel"):
        if key in expected and meta.get(key) != expected[key]:
            raise ValueError(
                f"checkpoint {tag_dir} has {key}={meta.get(key)!r} but this run has {key}={expected[key]!r}: "
                f"resume with the matching config (model/head/data sections) or start a new output directory")


def _load_fc7(parts: TrainParts, tag_dir: Path, meta: dict[str, Any], log: Callable[[str], None]) -> None:
    """This rank's FC7 shard; shards stored at another world size (a run on another cluster size, or a
    `megaface convert fc7 --reshard` copy) are resharded on load."""
    state = parts.state
    shard, stored_world = load_rank_shard(tag_dir, state.world_size, state.rank)
    if stored_world != state.world_size:
        log(f"resume: FC7 resharded from {stored_world} to {state.world_size} ranks")
    load_shard_state_dict(parts.head, parts.fc7_optimizer, shard)


def load_checkpoint(parts: TrainParts, tag_dir: Path, expected: dict[str, Any], zero_stage: int,
                    precision: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Load everything saved by `save_checkpoint`; returns this rank's trainer state (RNG already restored)."""
    meta = read_meta(tag_dir)
    check_compatible(meta, expected, tag_dir)
    state = parts.state
    same_world = int(meta["world_size"]) == state.world_size
    same_layout = int(meta.get("zero_stage", 0)) == zero_stage and meta.get("precision") == precision
    unpartitioned = zero_stage == 0 and precision == "fp32"
    if same_layout and (same_world or unpartitioned):
        parts.engine.load_checkpoint(str(tag_dir), tag=DS_DIR, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    else:
        if int(meta.get("zero_stage", 0)) == 3:
            raise ValueError(f"checkpoint {tag_dir} is ZeRO-3 at world size {meta['world_size']}; this run is "
                             f"ZeRO-{zero_stage} at world size {state.world_size}: consolidate it first "
                             "(megaface convert consolidate) or resume with the same world size and stage")
        parts.engine.load_checkpoint(str(tag_dir), tag=DS_DIR, load_module_only=True)
        log(f"resume: world size {meta['world_size']} -> {state.world_size} or ZeRO/precision changed "
            f"(ZeRO-{meta.get('zero_stage')} {meta.get('precision')} -> ZeRO-{zero_stage} {precision}): "
            "backbone weights loaded, backbone optimizer state (momentum) starts fresh")
    if parts.fc7_optimizer is not None:
        _load_fc7(parts, tag_dir, meta, log)
    rank_file = tag_dir / TRAINER_DIR / trainer_file_name(state.rank if same_world else 0)
    trainer_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    set_rng_state(trainer_state["rng"])
    trainer_state["same_world"] = same_world
    return trainer_state
