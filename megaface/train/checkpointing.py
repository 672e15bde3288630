"""Save and resume a whole training run (layout in `megaface.checkpoint`).

Atomicity: every rank writes into `<tag>.tmp/`; after a barrier rank 0 writes meta.json, renames the
directory to `<tag>` and only then rewrites `latest`. A crash before the rename leaves a `.tmp` directory
that nothing reads (the next save of that tag removes it) and `latest` still names the previous complete
checkpoint. On several nodes the output directory must be a shared filesystem (as DeepSpeed also assumes).

Integrity: before anything is written, every floating tensor the checkpoint holds (parameters, buffers such as
BatchNorm running statistics, optimizer state, FC7 and its state) is checked finite on every rank and the
flags are reduced in one all-reduce; a non-finite state raises `NonFiniteState` and nothing is saved, so
`latest` only ever names a checkpoint whose meta.json says `verified_finite`. Every rank hashes the files it
wrote (sha256); rank 0 stores the digests in meta.json and resume verifies them (split over the ranks)
before loading anything. Pruning never deletes the newest verified checkpoint.

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
from megaface.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINTS_DIR,
    DS_DIR,
    LATEST,
    META_FILE,
    TAG_PREFIX,
    TRAINER_DIR,
    load_torch_file,
    read_meta,
    tag_for,
    trainer_file_name,
)
from megaface.checkpoint.fc7_shards import load_rank_shard, load_shard_state_dict
from megaface.checkpoint.integrity import (
    FILES_KEY,
    FINITE_KEY,
    digests,
    file_owner,
    files_for_rank,
    is_verified,
    last_verified,
    list_files,
    local_finite,
    missing_ds_problem,
    verify_files,
)
from megaface.checkpoint.layout import TMP_SUFFIX, tmp_tag_name
from megaface.distributed import comm
from megaface.fileio import atomic_write_text
from megaface.train.build import TrainParts
from megaface.train.checkpoint_writes import (
    CheckpointNotWritten,
    not_written_message,
    rank_failure,
    write_failure,
    write_rank_files,
)


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


class NonFiniteState(RuntimeError):
    """A tensor to be saved (weights, buffers, optimizer state, FC7) holds inf/NaN on some rank: the checkpoint
    was not saved."""


def healthy_note(output_dir: Path) -> str:
    """Where to resume after a divergence: the newest checkpoint verified finite, or none."""
    tag = last_verified(output_dir)
    if tag is None:
        return "no verified-finite checkpoint exists in this output directory yet"
    return f"the last healthy checkpoint is {tag}: resume from it with --resume {tag}"


def _optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Parameters and state tensors of an optimizer and of the optimizers it wraps (DeepSpeed's ZeRO / bf16
    wrappers keep the fp32 master weights and momentum in an inner torch optimizer)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        for group in getattr(optimizer, "param_groups", []):
            out += [p for p in group.get("params", []) if torch.is_tensor(p)]
        for per_param in getattr(optimizer, "state", {}).values():
            if isinstance(per_param, dict):
                out += [v for v in per_param.values() if torch.is_tensor(v)]
        optimizer = getattr(optimizer, "optimizer", None)
    return out


def written_tensors(parts: TrainParts) -> list[torch.Tensor]:
    """Every tensor a checkpoint writes from memory: the engine module's state_dict (parameters and buffers -
    BatchNorm running statistics, and whatever a future model registers), ZeRO-3 partitions, the engine's
    optimizer (master weights, momentum), and the sharded FC7 with its optimizer state."""
    module = parts.engine.module
    tensors = [t for t in module.state_dict(keep_vars=True).values() if torch.is_tensor(t)]
    tensors += [p.ds_tensor for p in module.parameters() if torch.is_tensor(getattr(p, "ds_tensor", None))]
    tensors += _optimizer_tensors(parts.engine.optimizer)
    if parts.fc7_optimizer is not None:
        tensors += [t for t in parts.head.state_dict(keep_vars=True).values() if torch.is_tensor(t)]
        tensors += _optimizer_tensors(parts.fc7_optimizer)
    return tensors


def state_is_finite(parts: TrainParts) -> bool:
    """Collective: True when every floating tensor to be written (`written_tensors`) is finite on every rank
    (one all-reduce of a flag)."""
    flag = local_finite(iter(written_tensors(parts))).to(parts.state.device)
    return bool(comm.all_reduce_(flag, "min", parts.state.group))  # host sync: all ranks decide alike


def _agree_on_files(tmp: Path, state: Any, failure: str | None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Collective (one all-gather): (sha256 of every rank's files, every rank's write failure). Each rank hashes
    the files it wrote, while they are still in its page cache; a rank whose write failed hashes nothing."""
    mine = [rel for rel in list_files(tmp) if file_owner(rel, state.world_size) == state.rank]
    local = (digests(tmp, mine) if failure is None else {}, failure)
    merged: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for part, problem in comm.all_gather_object(local, state.group):
        merged.update(part)
        failures += [problem] if problem is not None else []
    return merged, failures


def save_checkpoint(parts: TrainParts, output_dir: Path, iteration: int, trainer_state: dict[str, Any],
                    meta: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final tag directory.

    Raises NonFiniteState (on every rank, nothing written) when the state to save holds inf/NaN, and
    CheckpointNotWritten (on every rank, the temporary removed, `latest` unchanged) when a rank cannot write."""
    state = parts.state
    if not state_is_finite(parts):
        raise NonFiniteState(f"weights, buffers, optimizer state or FC7 hold inf/NaN after iteration {iteration}")
    ckpt_dir = Path(output_dir) / CHECKPOINTS_DIR
    tag = tag_for(iteration)
    tmp, final = ckpt_dir / tmp_tag_name(tag), ckpt_dir / tag
    failure = None
    if state.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted save
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            failure = rank_failure(0, write_failure(tmp, err))
    failure = comm.broadcast_object(failure, src=0, group=state.group)  # also the barrier before writing
    if failure is None:
        failure = write_rank_files(parts, tmp, {**trainer_state, "rng": rng_state()})
        failure = None if failure is None else rank_failure(state.rank, failure)
    comm.barrier(state.group)
    files, failures = _agree_on_files(tmp, state, failure)  # also the barrier: every rank's files are complete
    if not failures and state.is_main:
        full_meta = {"format": CHECKPOINT_FORMAT, "iteration": iteration, "megaface_version": megaface.__version__,
                     **meta, FINITE_KEY: True, FILES_KEY: files}
        failures = _commit(tmp, final, ckpt_dir, json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        if not failures:
            _prune(ckpt_dir, keep_last, keep=tag)
    failures = comm.broadcast_object(failures, src=0, group=state.group)  # every rank raises alike, or none
    if failures:
        if state.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier(state.group)
        raise CheckpointNotWritten(not_written_message(tag, failures, ckpt_dir))
    return final


def _commit(tmp: Path, final: Path, ckpt_dir: Path, meta_text: str) -> list[str]:
    """Rank 0: meta.json, the rename, then `latest`; [] on success, else the failure (nothing half-done left:
    a failed `latest` rewrite takes the renamed directory away again, so `latest` and the tags agree)."""
    tag = final.name
    path = tmp / META_FILE
    try:
        atomic_write_text(path, meta_text)
        if final.exists():  # a save at the same iteration (e.g. resumed at the end): replace it
            shutil.rmtree(final)
        path = final
        tmp.rename(final)
        path = ckpt_dir / LATEST
        atomic_write_text(path, tag + "\n")
    except OSError as err:
        if path == ckpt_dir / LATEST:
            shutil.rmtree(final, ignore_errors=True)
        return [rank_failure(0, write_failure(path, err))]
    return []


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` checkpoints, never `keep` nor the newest verified-finite one."""
    if keep_last <= 0:
        return
    tags = sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and not p.name.endswith(TMP_SUFFIX))
    healthy = next((p.name for p in reversed(tags) if is_verified(p)), None)
    for old in tags[:-keep_last]:
        if old.name not in (keep, healthy):
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
    if shard["weight"].dtype != parts.head.weight.dtype:
        log(f"resume: FC7 weight converted from {shard['weight'].dtype} to {parts.head.weight.dtype} "
            "(head.weight_dtype differs from the checkpoint's)")
    load_shard_state_dict(parts.head, parts.fc7_optimizer, shard)


def verify_checkpoint(tag_dir: Path, meta: dict[str, Any], state: Any, log: Callable[[str], None]) -> None:
    """Collective: compare the files with meta.json's digests (each rank hashes its share) before loading;
    every rank raises the same one-line ValueError naming the first damaged file."""
    problem = missing_ds_problem(tag_dir)
    if problem is not None:
        raise ValueError(problem)
    expected = meta.get(FILES_KEY)
    if not expected:
        log(f"resume: {tag_dir} has no file digests (saved by an older megaface): files not verified")
        return
    mine = verify_files(tag_dir, expected, files_for_rank(list(expected), state.rank, state.world_size))
    problems = [p for part in comm.all_gather_object(mine, state.group) for p in part]
    if problems:
        more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


def _load_ds(parts: TrainParts, tag_dir: Path, **kwargs: Any) -> None:
    """engine.load_checkpoint with one clear line instead of DeepSpeed's traceback or silent None."""
    try:
        path, _ = parts.engine.load_checkpoint(str(tag_dir), tag=DS_DIR, **kwargs)
    except Exception as err:  # noqa: BLE001 - any reader failure here is a damaged or incomplete ds/ folder
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{tag_dir / DS_DIR}: DeepSpeed cannot load it ({type(err).__name__}: {detail}); a file "
                         "is truncated, missing or from another layout: check it with `megaface convert inspect "
                         "--verify` and resume from another checkpoint") from None
    if path is None:
        raise ValueError(f"{tag_dir / DS_DIR}: DeepSpeed found no checkpoint files there; resume from another "
                         "checkpoint")


def load_checkpoint(parts: TrainParts, tag_dir: Path, expected: dict[str, Any], zero_stage: int,
                    precision: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Load everything saved by `save_checkpoint`; returns this rank's trainer state (RNG already restored)."""
    meta = read_meta(tag_dir)
    check_compatible(meta, expected, tag_dir)
    state = parts.state
    verify_checkpoint(tag_dir, meta, state, log)
    same_world = int(meta["world_size"]) == state.world_size
    same_layout = int(meta.get("zero_stage", 0)) == zero_stage and meta.get("precision") == precision
    unpartitioned = zero_stage == 0 and precision == "fp32"
    if same_layout and (same_world or unpartitioned):
        _load_ds(parts, tag_dir, load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        if int(meta.get("zero_stage", 0)) == 3:
            raise ValueError(f"checkpoint {tag_dir} is ZeRO-3 at world size {meta['world_size']}; this run is "
                             f"ZeRO-{zero_stage} at world size {state.world_size}: consolidate it first "
                             "(megaface convert consolidate) or resume with the same world size and stage")
        _load_ds(parts, tag_dir, load_module_only=True)
        log(f"resume: world size {meta['world_size']} -> {state.world_size} or ZeRO/precision changed "
            f"(ZeRO-{meta.get('zero_stage')} {meta.get('precision')} -> ZeRO-{zero_stage} {precision}): "
            "backbone weights loaded, backbone optimizer state (momentum) starts fresh")
    if parts.fc7_optimizer is not None:
        _load_fc7(parts, tag_dir, meta, log)
    rank_file = tag_dir / TRAINER_DIR / trainer_file_name(state.rank if same_world else 0)
    trainer_state = load_torch_file(rank_file, "this rank's trainer state (loader position, RNG)",
                                    weights_only=False)
    set_rng_state(trainer_state["rng"])
    trainer_state["same_world"] = same_world
    return trainer_state
