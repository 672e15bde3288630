"""Merge and reshard the model-parallel FC7 (classifier rows + SGD momentum) of a checkpoint.

A checkpoint saved at world size W holds `fc7/shard_RRRRR_of_WWWWW.pt` for r < W (the dicts written by
`megaface.head.shard_state_dict`). `merge_shards` stacks them into the full [num_classes, D] matrix in class
order; `reshard` re-splits that for another world size with `megaface.head.sharding.class_range`, so the
trainer can resume on a different number of ranks (and `megaface convert fc7 --reshard W` can write such a
checkpoint ahead of time).

Shard dicts are read as plain dicts: this module only needs torch and the class-range math.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from megaface.checkpoint.integrity import FILES_KEY, digests, list_files
from megaface.checkpoint.layout import DS_DIR, FC7_DIR, META_FILE, load_torch_file
from megaface.fileio import atomic_output_dir, atomic_output_file
from megaface.head.optim import SHARD_FORMAT
from megaface.head.sharding import class_range

MERGED_FORMAT = "megaface.fc7_full.v1"
_SHARD_NAME = re.compile(r"^shard_(\d+)_of_(\d+)\.pt$")
_REQUIRED = ("weight", "class_start", "num_local", "num_classes", "embedding_size", "rank", "world_size")
# Keys that describe one rank's slice (rebuilt by reshard); everything else is a run-wide setting that is
# copied from rank 0. The Partial FC sampler state belongs to a rank and is dropped: the head re-seeds it.
_PER_RANK = {"format", "weight", "momentum", "class_start", "num_local", "rank", "world_size", "sampler_rng"}

__all__ = ["MERGED_FORMAT", "shard_file_name", "merge_shards", "reshard", "split_merged", "load_rank_shard",
           "load_checkpoint_shards", "merge_checkpoint", "reshard_checkpoint"]


def shard_file_name(rank: int, world_size: int) -> str:
    """The file name of rank `rank`'s FC7 shard in a checkpoint saved at `world_size` ranks."""
    return f"shard_{rank:05d}_of_{world_size:05d}.pt"


# ---- validation -------------------------------------------------------------------------------------------

def _check_one(state: Any, name: str) -> None:
    if not isinstance(state, dict) or state.get("format") != SHARD_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{name}: not an FC7 shard (format {found!r}, expected {SHARD_FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{name}: FC7 shard lacks {missing}; the file is damaged or from another tool")
    num_local, dim = int(state["num_local"]), int(state["embedding_size"])
    for key in ("weight", "momentum"):
        value = state.get(key)
        if value is None and key == "momentum":
            continue
        if not torch.is_tensor(value) or tuple(value.shape) != (num_local, dim):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{name}: FC7 {key} has shape {shape}, expected [num_local={num_local}, "
                             f"embedding_size={dim}]")


def _check_same(states: Sequence[dict], names: Sequence[str], key: str) -> int:
    first = int(states[0][key])
    for state, name in zip(states, names):
        if int(state[key]) != first:
            raise ValueError(f"{name}: {key}={state[key]} but {names[0]} has {key}={first}; all shards of "
                             "one checkpoint must agree (shards from different runs mixed?)")
    return first


def _check_ranks(states: Sequence[dict], names: Sequence[str], world_size: int) -> None:
    seen: dict[int, str] = {}
    for state, name in zip(states, names):
        rank = int(state["rank"])
        if not 0 <= rank < world_size:
            raise ValueError(f"{name}: extra shard: rank {rank} is outside world size {world_size}")
        if rank in seen:
            raise ValueError(f"{name}: extra shard: rank {rank} also comes from {seen[rank]}")
        seen[rank] = name
    missing = [r for r in range(world_size) if r not in seen]
    if missing:
        raise ValueError(f"missing FC7 shard(s) for rank(s) {missing} of world size {world_size} (expected "
                         f"{', '.join(shard_file_name(r, world_size) for r in missing)}); found {list(names)}")


def _check_ranges(order: Sequence[int], states: Sequence[dict], names: Sequence[str], num_classes: int) -> None:
    """The shards' class ranges must tile [0, num_classes) exactly: no gap, no overlap."""
    end, prev = 0, "the start"
    for i in order:
        start, count = int(states[i]["class_start"]), int(states[i]["num_local"])
        if start != end:
            kind = f"overlaps {prev}" if start < end else f"leaves a gap after {prev}"
            raise ValueError(f"{names[i]}: class range [{start}, {start + count}) {kind}: expected it to "
                             f"start at class {end}")
        end, prev = start + count, f"{names[i]} (ends at class {start + count})"
    if end != num_classes:
        raise ValueError(f"FC7 shards cover classes [0, {end}) but num_classes={num_classes}; last shard "
                         f"{prev}")


def _validate(states: Sequence[dict], names: Sequence[str] | None) -> tuple[list[int], list[str]]:
    """Validate a complete shard set; return the indices in class order and the names used in errors."""
    if not states:
        raise ValueError("no FC7 shards given; expected one per rank of the saved world size")
    names = list(names) if names is not None else [f"shard #{i}" for i in range(len(states))]
    if len(names) != len(states):
        raise ValueError(f"{len(names)} names for {len(states)} FC7 shards")
    for state, name in zip(states, names):
        _check_one(state, name)
    num_classes = _check_same(states, names, "num_classes")
    _check_same(states, names, "embedding_size")
    world_size = _check_same(states, names, "world_size")
    _check_ranks(states, names, world_size)
    has_momentum = [s.get("momentum") is not None for s in states]
    if any(has_momentum) and not all(has_momentum):
        name = names[has_momentum.index(False)]
        raise ValueError(f"{name}: has no momentum while other shards do; all shards must carry it or none")
    order = sorted(range(len(states)), key=lambda i: int(states[i]["class_start"]))
    _check_ranges(order, states, names, num_classes)
    return order, names


# ---- merge / reshard (pure: dicts in, dicts out) ------------------------------------------------------------

def merge_shards(states: Sequence[dict], names: Sequence[str] | None = None) -> dict[str, Any]:
    """The full FC7 of a complete shard set: weight (and momentum) [num_classes, D] in class order.

    `names` (e.g. the shard file paths) are used in error messages. Returns {"format": MERGED_FORMAT,
    "weight", "momentum" (or None), "num_classes", "embedding_size", "source_world_size", "class_ranges",
    "hyper", ...run-wide extras of rank 0's shard}.
    """
    order, _ = _validate(states, names)
    ordered = [states[i] for i in order]
    momentum = None
    if ordered[0].get("momentum") is not None:
        momentum = torch.cat([s["momentum"].detach().cpu() for s in ordered])
    rank0 = next(s for s in states if int(s["rank"]) == 0)
    extras = {k: v for k, v in rank0.items() if k not in _PER_RANK}
    return {
        **extras,
        "format": MERGED_FORMAT,
        "weight": torch.cat([s["weight"].detach().cpu() for s in ordered]),
        "momentum": momentum,
        "num_classes": int(rank0["num_classes"]),
        "embedding_size": int(rank0["embedding_size"]),
        "source_world_size": int(rank0["world_size"]),
        "class_ranges": [[int(s["class_start"]), int(s["num_local"])] for s in ordered],
    }


def split_merged(merged: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Shard dicts for `world_size` ranks from a `merge_shards` result (rows split by `class_range`)."""
    if merged.get("format") != MERGED_FORMAT:
        raise ValueError(f"not a merged FC7 (format {merged.get('format')!r}, expected {MERGED_FORMAT!r})")
    world_size = int(world_size)
    num_classes = int(merged["num_classes"])
    extras = {k: v for k, v in merged.items()
              if k not in _PER_RANK and k not in ("source_world_size", "class_ranges")}
    shards = []
    for rank in range(world_size):
        start, count = class_range(num_classes, world_size, rank)
        rows = slice(start, start + count)
        momentum = merged.get("momentum")
        shards.append({
            **extras,
            "format": SHARD_FORMAT,
            # clone: a view would keep (and torch.save would write) the whole merged matrix
            "weight": merged["weight"][rows].clone(),
            "momentum": None if momentum is None else momentum[rows].clone(),
            "class_start": start,
            "num_local": count,
            "rank": rank,
            "world_size": world_size,
            "sampler_rng": None,
        })
    return shards


def reshard(states: Sequence[dict], world_size: int, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Re-split a complete shard set (any saved world size) into `world_size` shards, rank order.

    Weights and momentum rows are moved exactly (no arithmetic), so training resumed on the new world size
    sees the same classifier and optimizer state. Per-rank sampler states are dropped (`sampler_rng=None`).
    """
    return split_merged(merge_shards(states, names), world_size)


# ---- checkpoint files ---------------------------------------------------------------------------------------

def load_checkpoint_shards(tag_dir: str | os.PathLike, mmap: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """(shard dicts, file paths) of a checkpoint's fc7/ directory, validated as a complete set, rank order.

    The shard count comes from the files themselves (`shard_R_of_W.pt`), so a checkpoint resharded by
    `megaface convert fc7 --reshard` is read like one saved at that world size. mmap=True maps the tensors
    instead of reading them (for a quick look at a large head).
    """
    fc7_dir = Path(tag_dir) / FC7_DIR
    if not fc7_dir.is_dir():
        raise FileNotFoundError(f"{fc7_dir} does not exist: the checkpoint has no model-parallel FC7 shards "
                                "(a data-parallel head lives inside the DeepSpeed checkpoint)")
    files = sorted(p for p in fc7_dir.iterdir() if p.suffix == ".pt")
    if not files:
        raise FileNotFoundError(f"{fc7_dir} holds no shard_RRRRR_of_WWWWW.pt files")
    worlds = set()
    for path in files:
        match = _SHARD_NAME.match(path.name)
        if match is None:
            raise ValueError(f"{path}: unexpected file in {fc7_dir} (expected shard_RRRRR_of_WWWWW.pt)")
        worlds.add(int(match.group(2)))
    if len(worlds) > 1:
        raise ValueError(f"{fc7_dir} mixes shards of world sizes {sorted(worlds)}: extra shard files from "
                         "another save; keep only one set")
    states = [load_torch_file(p, "an FC7 shard (megaface.head.shard_state_dict)", mmap=mmap) for p in files]
    names = [str(p) for p in files]
    for state, path in zip(states, files):
        match = _SHARD_NAME.match(path.name)
        if isinstance(state, dict) and "rank" in state and (int(state["rank"]), int(state.get("world_size", -1))) \
                != (int(match.group(1)), int(match.group(2))):
            raise ValueError(f"{path}: holds rank {state['rank']} of world size {state.get('world_size')}, "
                             "which does not match its file name (renamed file?)")
    _validate(states, names)
    return states, names


def _check_meta(meta: dict[str, Any], merged: dict[str, Any], tag_dir: Path) -> None:
    for key in ("num_classes", "embedding_size"):
        if key in meta and int(meta[key]) != int(merged[key]):
            raise ValueError(f"{tag_dir / 'meta.json'}: {key}={meta[key]} but the FC7 shards have "
                             f"{key}={merged[key]}; the shards belong to another run")


def _data_parallel_fc7(tag_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A replicated FC7 (parallel="data") is the engine's `head.weight`; its momentum is not extracted."""
    from megaface.checkpoint.backbone import strip_wrappers
    from megaface.checkpoint.zero_reader import read_fp32_state_dict

    state = strip_wrappers(read_fp32_state_dict(tag_dir / DS_DIR)[0])
    if "head.weight" not in state:
        raise ValueError(f"{tag_dir / 'ds'}: no 'head.weight' although meta.json says parallel='data' "
                         f"(found e.g. {list(state)[:4]})")
    weight = state["head.weight"]
    return {"format": MERGED_FORMAT, "weight": weight, "momentum": None, "num_classes": int(weight.shape[0]),
            "embedding_size": int(weight.shape[1]), "source_world_size": int(meta.get("world_size", 1)),
            "class_ranges": [[0, int(weight.shape[0])]], "parallel": "data", "hyper": None}


def merge_checkpoint(tag_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the merged FC7 of a checkpoint to `output` (torch file; atomic) and return its path.

    A data-parallel head (parallel="data") is taken from the DeepSpeed checkpoint (weight only)."""
    from megaface.checkpoint import read_meta

    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir)
    if meta.get("parallel") == "data" and not (tag_dir / FC7_DIR).is_dir():
        merged = _data_parallel_fc7(tag_dir, meta)
    else:
        states, names = load_checkpoint_shards(tag_dir)
        merged = merge_shards(states, names)
    _check_meta(meta, merged, tag_dir)
    merged.update(network=meta.get("network"), iteration=meta.get("iteration"), source=str(tag_dir))
    with atomic_output_file(output) as tmp:
        torch.save(merged, tmp)
    return Path(output)


def reshard_checkpoint(tag_dir: str | os.PathLike, world_size: int, output: str | os.PathLike) -> Path:
    """Copy a checkpoint to `output` with its FC7 shards rewritten for `world_size` ranks.

    Everything else (DeepSpeed files, trainer state) is copied unchanged; meta.json gets the new
    `class_ranges` plus `fc7_world_size` and `fc7_resharded_from`. `world_size` in meta.json stays the
    world size the DeepSpeed part was saved at (its partitions are not rewritten).
    """
    from megaface.checkpoint import read_meta

    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir)
    if meta.get("parallel") == "data":
        raise ValueError(f"{tag_dir} has a data-parallel FC7 (parallel='data', replicated inside the DeepSpeed "
                         "checkpoint): there are no shards to reshard")
    states, names = load_checkpoint_shards(tag_dir)
    merged = merge_shards(states, names)
    _check_meta(meta, merged, tag_dir)
    shards = split_merged(merged, world_size)  # before any file is written: errors leave nothing behind
    meta = {**meta, "class_ranges": [[s["class_start"], s["num_local"]] for s in shards],
            "fc7_world_size": int(world_size), "fc7_resharded_from": int(merged["source_world_size"])}
    with atomic_output_dir(output) as tmp:
        for item in tag_dir.iterdir():
            if item.name in (FC7_DIR, META_FILE):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / FC7_DIR).mkdir()
        for shard in shards:
            torch.save(shard, tmp / FC7_DIR / shard_file_name(shard["rank"], world_size))
        if FILES_KEY in meta:  # the copy's own digests (the shard files are new)
            meta[FILES_KEY] = digests(tmp, list_files(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(output)


def load_rank_shard(tag_dir: str | os.PathLike, world_size: int, rank: int) -> tuple[dict[str, Any], int]:
    """(shard dict for `rank` of `world_size`, world size the shards were stored at) for resuming.

    Reads only this rank's file when the stored shards already match `world_size`; otherwise loads the
    whole set and reshards it (every rank does the same, deterministic work).
    """
    fc7_dir = Path(tag_dir) / FC7_DIR
    own = fc7_dir / shard_file_name(rank, world_size)
    stored = {int(m.group(2)) for p in fc7_dir.glob("shard_*_of_*.pt") if (m := _SHARD_NAME.match(p.name))}
    if stored == {int(world_size)} and own.is_file():
        state = load_torch_file(own, "an FC7 shard (megaface.head.shard_state_dict)")
        _check_one(state, str(own))
        return state, int(world_size)
    states, names = load_checkpoint_shards(tag_dir)
    return reshard(states, world_size, names)[rank], int(states[0]["world_size"])
