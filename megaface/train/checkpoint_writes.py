"""Writing one rank's checkpoint files with write failures caught, and the one line that reports them.

A full disk, an exhausted quota or a file-size limit (`ulimit -f`) makes a write fail on one rank while the
others go on; raising there would leave the other ranks inside DeepSpeed's save (its barriers) or in ours,
and torch reports such a failure as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`.
So every write of this rank is attempted under a guard that records the first failure (DeepSpeed's own
writes too, through its checkpoint engine's `save`), later writes are skipped, and the collective save in
`megaface.train.checkpointing` lets every rank learn every failure before any of them raises.
"""

from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path
from typing import Any, Callable

from megaface.checkpoint import DS_DIR, FC7_DIR, LATEST, TRAINER_DIR, fc7_shard_file_name, trainer_file_name
from megaface.checkpoint.fc7_shards import shard_state_dict
from megaface.fileio import atomic_torch_save
from megaface.train.build import TrainParts

WRITE_ERRORS = (OSError, RuntimeError)  # RuntimeError: torch.save's zip writer on ENOSPC / EFBIG


class CheckpointNotWritten(RuntimeError):
    """A rank could not write its part of a checkpoint; the temporary is gone and `latest` is unchanged."""


def write_failure(path: Path | str, err: BaseException) -> str:
    """'PATH (what failed)' for the first write that failed."""
    if isinstance(err, OSError) and err.errno is not None:
        reason = f"{err.strerror} [{errno.errorcode.get(err.errno, err.errno)}]"
    else:  # torch's zip writer names no errno ("unexpected pos", "file write failed"): say how far it got
        try:
            written = f"after {Path(path).stat().st_size} bytes"
        except OSError:
            written = "before anything was on disk"
        reason = f"torch.save stopped {written}"
    return f"{path} ({reason})"


def rank_failure(rank: int, failure: str) -> str:
    """'rank R cannot write PATH (what failed)': every rank's line then says whose write failed, the ranks whose
    own writes succeeded included."""
    return f"rank {rank} cannot write {failure}"


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def not_written_message(tag: str, failures: list[str], ckpt_dir: Path) -> str:
    """One line (`failures` as `rank_failure` gives them): which rank could not write what, the free space
    and the file-size limit, what `latest` still is."""
    try:
        free = f"{_human(shutil.disk_usage(ckpt_dir).free)} free on {ckpt_dir}"
    except OSError:
        free = f"free space on {ckpt_dir} unknown"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        free += f", file-size limit (ulimit -f) {_human(limit)}"
    try:
        previous = f"{(ckpt_dir / LATEST).read_text().strip()} is still latest"
    except OSError:
        previous = "no earlier checkpoint"
    more = f" (and {len(failures) - 1} more failed writes)" if len(failures) > 1 else ""
    return (f"checkpoint {tag} not saved: {failures[0]}{more}; {free}; {previous}: free space or "
            "raise the quota / file-size limit, then resume with --resume latest")


def write_rank_files(parts: TrainParts, tmp: Path, trainer_state: dict[str, Any]) -> str | None:
    """This rank's files into `tmp` (DeepSpeed's part, its FC7 shard, its trainer state); the first write
    failure as `write_failure` text, or None. Never raises for a failed write, so that every rank reaches the
    same collectives (DeepSpeed's barriers included)."""
    state = parts.state
    failure = _deepspeed_save(parts.engine, tmp)
    if failure is not None:
        return failure
    path = tmp / TRAINER_DIR
    try:
        path.mkdir(exist_ok=True)
        if parts.fc7_optimizer is not None:
            path = tmp / FC7_DIR
            path.mkdir(exist_ok=True)
            path = tmp / FC7_DIR / fc7_shard_file_name(state.rank, state.world_size)
            atomic_torch_save(shard_state_dict(parts.head, parts.fc7_optimizer), path)
        path = tmp / TRAINER_DIR / trainer_file_name(state.rank)
        atomic_torch_save(trainer_state, path)
    except WRITE_ERRORS as err:
        return write_failure(path, err)
    return None


def _deepspeed_save(engine: Any, tmp: Path) -> str | None:
    """engine.save_checkpoint into tmp/ds with each file write guarded (see the module docstring)."""
    failures: list[str] = []
    checkpoint_engine = engine.checkpoint_engine
    original: Callable[..., Any] = checkpoint_engine.save

    def guarded(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        if failures:  # the checkpoint is lost already: write nothing more, reach the barriers quickly
            return None
        try:
            return original(state_dict, path, *args, **kwargs)
        except WRITE_ERRORS as err:
            failures.append(write_failure(path, err))
            return None

    checkpoint_engine.save = guarded  # an instance attribute shadows the method for this save only
    try:
        engine.save_checkpoint(str(tmp), tag=DS_DIR, save_latest=False)
    except OSError as err:  # a directory DeepSpeed could not create (ENOSPC, EDQUOT)
        failures.append(write_failure(tmp / DS_DIR, err))
    finally:
        del checkpoint_engine.save
    return failures[0] if failures else None
