"""Checkpoint integrity: per-file sha256 digests in meta.json, their verification, and a finite-tensor scan.

meta.json of a checkpoint saved by this version holds

    "files": {"ds/mp_rank_00_model_states.pt": {"sha256": "<64 hex>", "bytes": 1234}, ...}
    "verified_finite": true      every floating tensor written (parameters, buffers, optimizer state, FC7) was
                                 checked finite on every rank before saving

Every rank hashes the files it wrote itself (`file_owner`: its trainer file, its FC7 shard, its DeepSpeed
partition; rank 0 the rest), while they are still in its page cache; rank 0 merges the digests into
meta.json. Verification (`verify_files`) is the same per-file comparison and can be split over ranks
(`files_for_rank`), so resuming a large checkpoint reads each byte once in the whole job.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from megaface.checkpoint.layout import (
    CHECKPOINTS_DIR,
    DS_DIR,
    META_FILE,
    TAG_PREFIX,
    TMP_SUFFIX,
    file_owner_rank,
    read_meta,
    sidecar_path,
)

FILES_KEY = "files"
FINITE_KEY = "verified_finite"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(tag_dir: Path) -> list[str]:
    """Every file of a checkpoint except meta.json, as sorted '/'-separated paths relative to `tag_dir`."""
    tag_dir = Path(tag_dir)
    return sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != META_FILE)


def file_owner(rel_path: str, world_size: int) -> int:
    """The rank that wrote `rel_path` (by its name); files of no rank (DeepSpeed's model states) -> 0."""
    owner = file_owner_rank(rel_path)
    return 0 if owner is None else owner % max(world_size, 1)


def digests(tag_dir: Path, rel_paths: list[str]) -> dict[str, dict[str, Any]]:
    """{rel_path: {"sha256": hex, "bytes": size}} of the given files."""
    tag_dir = Path(tag_dir)
    return {rel: {"sha256": sha256_file(tag_dir / rel), "bytes": (tag_dir / rel).stat().st_size}
            for rel in rel_paths}


def files_for_rank(rel_paths: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's share of a verification (every world_size-th file of the sorted list)."""
    return sorted(rel_paths)[rank::max(world_size, 1)]


_FIX = ("copy the checkpoint again from a good source, or resume from an older one "
        "(`megaface convert inspect --verify CKPT` lists every damaged file)")


def verify_files(tag_dir: Path, expected: dict[str, dict[str, Any]], only: list[str] | None = None) -> list[str]:
    """Problems (one line each, naming the file) of `tag_dir`'s files against meta.json's digests."""
    tag_dir = Path(tag_dir)
    problems = []
    for rel in (sorted(expected) if only is None else only):
        path, want = tag_dir / rel, expected[rel]
        if not path.is_file():
            problems.append(f"{path} is missing (meta.json lists it, {want['bytes']} bytes): {_FIX}")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{path} has {size} bytes, meta.json recorded {want['bytes']} (truncated or "
                            f"overwritten): {_FIX}")
            continue
        found = sha256_file(path)
        if found != want["sha256"]:
            problems.append(f"{path}: sha256 {found} does not match {want['sha256']} recorded in meta.json "
                            f"(bit flips on disk or in a copy): {_FIX}")
    return problems


def unlisted_files(tag_dir: Path, expected: dict[str, dict[str, Any]]) -> list[str]:
    """Files present in the checkpoint that meta.json does not list (left by another tool or a copy)."""
    return [f"{Path(tag_dir) / rel} is not listed in meta.json (an extra file from another save or tool: "
            "move it out of the checkpoint)" for rel in list_files(tag_dir) if rel not in expected]


def missing_ds_problem(tag_dir: Path) -> str | None:
    ds_dir = Path(tag_dir) / DS_DIR
    if ds_dir.is_dir() and any(ds_dir.iterdir()):
        return None
    return (f"{ds_dir} is missing or empty: the checkpoint has no DeepSpeed part (backbone weights); "
            f"{_FIX}")


# ---- finite scan ---------------------------------------------------------------------------------------

def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{i}]")


def non_finite_tensors(path: Path) -> list[str]:
    """Names of the floating-point tensors in a torch file that hold inf/NaN (reads every tensor).

    DeepSpeed's files pickle DeepSpeed objects and need weights_only=False: only scan checkpoints you trust."""
    from megaface.checkpoint.layout import load_torch_file

    state = load_torch_file(path, "a checkpoint file", weights_only=False)
    return [name for name, t in _tensors(state)
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


def finite_problems(tag_dir: Path) -> list[str]:
    """One line per torch file of the checkpoint that cannot be read or holds non-finite tensors."""
    problems = []
    for rel in list_files(tag_dir):
        if not rel.endswith(".pt"):
            continue
        path = Path(tag_dir) / rel
        try:
            bad = non_finite_tensors(path)
        except (ValueError, FileNotFoundError) as err:
            problems.append(str(err))
            continue
        if bad:
            problems.append(f"{path}: {len(bad)} tensors hold inf/NaN ({', '.join(bad[:3])}"
                            f"{', ...' if len(bad) > 3 else ''}): the run had diverged; resume from an older "
                            "checkpoint with a lower optim.lr")
    return problems


def local_finite(tensors: Iterator[torch.Tensor]) -> torch.Tensor:
    """1.0 if every floating-point tensor is finite, else 0.0, as a float32 tensor (no host sync)."""
    flag = None
    for t in tensors:
        if t.is_floating_point() and t.numel():
            ok = torch.isfinite(t).all()
            flag = ok if flag is None else flag & ok
    return torch.ones(()) if flag is None else flag.float().cpu()


# ---- discovery of the last healthy checkpoint ------------------------------------------------------------

def is_verified(tag_dir: Path) -> bool:
    try:
        return bool(read_meta(tag_dir).get(FINITE_KEY))
    except (ValueError, FileNotFoundError, OSError):
        return False


def last_verified(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under OUTPUT/checkpoints whose meta says it was verified finite."""
    ckpt_dir = Path(output_dir) / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        return None
    tags = sorted((p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if not p.name.endswith(TMP_SUFFIX)), reverse=True)
    return next((p for p in tags if is_verified(p)), None)


# ---- readers: verify before use ----------------------------------------------------------------------------

def verify_checkpoint(tag_dir: Path) -> None:
    """Raise ValueError unless every file of `tag_dir` matches its sha256 digest in meta.json.

    Every reader (embed, eval, convert, model.init_from) calls this before it trusts a checkpoint; a
    checkpoint saved before digests existed is let through with a warning.
    """
    tag_dir = Path(tag_dir)
    expected = read_meta(tag_dir).get(FILES_KEY)
    if expected is None:
        warnings.warn(f"{tag_dir} has no file digests in meta.json (saved by an older megaface): it is used "
                      "unverified", UserWarning, stacklevel=2)
        return
    problems = verify_files(tag_dir, expected)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0]}{more}; `--no-verify` uses it anyway")


def skipped_verification(what: str | os.PathLike) -> None:
    """The warning of `--no-verify`: the reader uses `what` without checking its digests."""
    warnings.warn(f"--no-verify: {what} is used without checking its sha256 digests; a damaged file gives "
                  "wrong results silently", UserWarning, stacklevel=2)


def open_checkpoint(path: str | os.PathLike, verify: bool = True) -> Path:
    """The complete tag dir `path` names (output dir, checkpoints dir or tag dir), its digests verified."""
    from megaface.checkpoint.layout import resolve_checkpoint

    tag_dir = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(tag_dir)
    else:
        skipped_verification(tag_dir)
    return tag_dir


def verify_backbone_file(path: Path, expected: str | None) -> None:
    """A backbone file against the sha256 its sidecar recorded (files without one are older: let through)."""
    if expected is None:
        return
    found = sha256_file(path)
    if found != expected:
        raise ValueError(f"{path}: sha256 {found} does not match {expected} recorded in {sidecar_path(path)} (bit flips "
                         "on disk or in a copy): copy it again from a good source or convert it again; "
                         "`--no-verify` uses it anyway")
