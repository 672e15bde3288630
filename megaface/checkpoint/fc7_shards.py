"""The FC7 shard file format: one file per rank, its one validator, merge, split and reshard.

A checkpoint saved at world size W holds `fc7/shard_RRRRR_of_WWWWW.pt` for r < W (the name is
`layout.fc7_shard_file_name`), each the dict of `shard_state_dict` (format megaface.fc7_shard.v1): the
rank's classifier rows `weight [num_local * K, D]` (K = `subcenters`, rows per class, 1 unless sub-center
ArcFace; a class's K rows are adjacent and never split between ranks), the optimizer's per-row state
(`megaface.head.optim.ROW_STATE_KEYS`: SGD momentum, or AdamW moments and row steps), the class range (`class_start`, `num_local`, `num_classes`), `rank`, `world_size`, the Partial FC
sampler state and the optimizer's hyper-parameters. `merge_shards` stacks a set into the full
[num_classes, D] matrix in class order; `reshard` re-splits it for another world size with
`megaface.head.sharding.class_range`, so a run can resume on a different number of ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from megaface.checkpoint.layout import FC7_DIR, FC7_SHARD_FILE, FC7_SHARD_GLOB, fc7_shard_file_name, load_torch_file
from megaface.head.optim import ROW_STATE_KEYS
from megaface.head.partial_fc import PartialFC
from megaface.head.sharding import class_range

SHARD_FORMAT = "megaface.fc7_shard.v1"
MERGED_FORMAT = "megaface.fc7_full.v1"
_REQUIRED = ("weight", "class_start", "num_local", "num_classes", "embedding_size", "rank", "world_size")
# Keys that describe one rank's slice (rebuilt by reshard); everything else is a run-wide setting that is
# copied from rank 0. The Partial FC sampler state belongs to a rank and is dropped: the head re-seeds it.
_PER_RANK = {"format", "weight", *ROW_STATE_KEYS, "class_start", "num_local", "rank", "world_size", "sampler_rng"}

__all__ = ["SHARD_FORMAT", "MERGED_FORMAT", "merge_shards", "reshard", "split_merged",
           "load_rank_shard", "load_checkpoint_shards", "shard_state_dict", "load_shard_state_dict", "subcenters_of"]


# ---- validation -------------------------------------------------------------------------------------------

def _check_one(state: Any, name: str) -> None:
    if not isinstance(state, dict) or state.get("format") != SHARD_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{name}: not an FC7 shard (format {found!r}, expected {SHARD_FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{name}: FC7 shard lacks {missing}; the file is damaged or from another tool")
    num_local, dim, k = int(state["num_local"]), int(state["embedding_size"]), subcenters_of(state)
    rows = num_local * k
    for key in ("weight", *ROW_STATE_KEYS):
        value = state.get(key)
        if value is None and key != "weight":
            continue
        expected = (rows,) if key == "row_step" else (rows, dim)
        if not torch.is_tensor(value) or tuple(value.shape) != expected:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            per_class = f" x subcenters={k}" if k > 1 else ""
            raise ValueError(f"{name}: FC7 {key} has shape {shape}, expected [num_local={num_local}{per_class}"
                             f"{'' if key == 'row_step' else f', embedding_size={dim}'}]")


def subcenters_of(state: dict) -> int:
    """Rows per class of a shard or merged FC7 (sub-center ArcFace's K; files without the key have 1)."""
    k = state.get("subcenters", 1)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"FC7 subcenters={k!r} must be an integer >= 1; the file is damaged")
    return k


def _check_same(states: Sequence[dict], names: Sequence[str], key: str) -> int:
    first = int(states[0][key])
    for state, name in zip(states, names, strict=False):
        if int(state[key]) != first:
            raise ValueError(f"{name}: {key}={state[key]} but {names[0]} has {key}={first}; all shards of "
                             "one checkpoint must agree (shards from different runs mixed?)")
    return first


def _check_ranks(states: Sequence[dict], names: Sequence[str], world_size: int) -> None:
    seen: dict[int, str] = {}
    for state, name in zip(states, names, strict=False):
        rank = int(state["rank"])
        if not 0 <= rank < world_size:
            raise ValueError(f"{name}: extra shard: rank {rank} is outside world size {world_size}")
        if rank in seen:
            raise ValueError(f"{name}: extra shard: rank {rank} also comes from {seen[rank]}")
        seen[rank] = name
    missing = [r for r in range(world_size) if r not in seen]
    if missing:
        raise ValueError(f"missing FC7 shard(s) for rank(s) {missing} of world size {world_size} (expected "
                         f"{', '.join(fc7_shard_file_name(r, world_size) for r in missing)}); found {list(names)}")


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
    for state, name in zip(states, names, strict=False):
        _check_one(state, name)
    num_classes = _check_same(states, names, "num_classes")
    _check_same(states, names, "embedding_size")
    for state, name in zip(states, names, strict=False):
        if subcenters_of(state) != subcenters_of(states[0]):
            raise ValueError(f"{name}: subcenters={subcenters_of(state)} but {names[0]} has "
                             f"{subcenters_of(states[0])}; all shards of one checkpoint must agree")
    world_size = _check_same(states, names, "world_size")
    _check_ranks(states, names, world_size)
    for key in ROW_STATE_KEYS:
        has = [s.get(key) is not None for s in states]
        if any(has) and not all(has):
            name = names[has.index(False)]
            raise ValueError(f"{name}: has no {key} while other shards do; all shards must carry it or none")
    order = sorted(range(len(states)), key=lambda i: int(states[i]["class_start"]))
    _check_ranges(order, states, names, num_classes)
    return order, names


# ---- merge / reshard (pure: dicts in, dicts out) ------------------------------------------------------------

def merge_shards(states: Sequence[dict], names: Sequence[str] | None = None) -> dict[str, Any]:
    """The full FC7 of a complete shard set: weight and per-row optimizer state [num_classes, ...] in class order.

    `names` (e.g. the shard file paths) are used in error messages. Returns {"format": MERGED_FORMAT,
    "weight", "momentum" (or None), the AdamW rows when present, "num_classes", "embedding_size",
    "source_world_size", "class_ranges",
    "hyper", ...run-wide extras of rank 0's shard}.
    """
    order, _ = _validate(states, names)
    ordered = [states[i] for i in order]
    rows = {key: torch.cat([s[key].detach().cpu() for s in ordered]) if ordered[0].get(key) is not None else None
            for key in ROW_STATE_KEYS}
    rows = {key: value for key, value in rows.items() if value is not None or key == "momentum"}
    rank0 = next(s for s in states if int(s["rank"]) == 0)
    extras = {k: v for k, v in rank0.items() if k not in _PER_RANK}
    return {
        **extras,
        "format": MERGED_FORMAT,
        "weight": torch.cat([s["weight"].detach().cpu() for s in ordered]),
        **rows,
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
    num_classes, k = int(merged["num_classes"]), subcenters_of(merged)
    extras = {k: v for k, v in merged.items()
              if k not in _PER_RANK and k not in ("source_world_size", "class_ranges")}
    shards = []
    for rank in range(world_size):
        start, count = class_range(num_classes, world_size, rank)
        rows = slice(start * k, (start + count) * k)  # a class's K rows stay together on one rank
        optimizer_rows = {key: merged[key][rows].clone() for key in ROW_STATE_KEYS if merged.get(key) is not None}
        shards.append({
            **extras,
            "format": SHARD_FORMAT,
            # clone: a view would keep (and torch.save would write) the whole merged matrix
            "weight": merged["weight"][rows].clone(),
            "momentum": None,
            **optimizer_rows,
            "class_start": start,
            "num_local": count,
            "rank": rank,
            "world_size": world_size,
            "sampler_rng": None,
        })
    return shards


def reshard(states: Sequence[dict], world_size: int, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Re-split a complete shard set (any saved world size) into `world_size` shards, rank order.

    Weights and optimizer rows are moved exactly (no arithmetic), so training resumed on the new world size
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
        match = FC7_SHARD_FILE.match(path.name)
        if match is None:
            raise ValueError(f"{path}: unexpected file in {fc7_dir} (expected shard_RRRRR_of_WWWWW.pt)")
        worlds.add(int(match.group(2)))
    if len(worlds) > 1:
        raise ValueError(f"{fc7_dir} mixes shards of world sizes {sorted(worlds)}: extra shard files from "
                         "another save; keep only one set")
    states = [load_torch_file(p, "an FC7 shard (megaface.head.shard_state_dict)", mmap=mmap) for p in files]
    names = [str(p) for p in files]
    for state, path in zip(states, files, strict=False):
        match = FC7_SHARD_FILE.match(path.name)
        assert match is not None  # every name matched in the loop above
        if isinstance(state, dict) and "rank" in state and (int(state["rank"]), int(state.get("world_size", -1))) \
                != (int(match.group(1)), int(match.group(2))):
            raise ValueError(f"{path}: holds rank {state['rank']} of world size {state.get('world_size')}, "
                             "which does not match its file name (renamed file?)")
    _validate(states, names)
    return states, names


def load_rank_shard(tag_dir: str | os.PathLike, world_size: int, rank: int) -> tuple[dict[str, Any], int]:
    """(shard dict for `rank` of `world_size`, world size the shards were stored at) for resuming.

    Reads only this rank's file when the stored shards already match `world_size`; otherwise loads the
    whole set and reshards it (every rank does the same, deterministic work).
    """
    fc7_dir = Path(tag_dir) / FC7_DIR
    own = fc7_dir / fc7_shard_file_name(rank, world_size)
    stored = {int(m.group(2)) for p in fc7_dir.glob(FC7_SHARD_GLOB) if (m := FC7_SHARD_FILE.match(p.name))}
    if stored == {int(world_size)} and own.is_file():
        state = load_torch_file(own, "an FC7 shard (megaface.head.shard_state_dict)")
        _check_one(state, str(own))
        return state, int(world_size)
    states, names = load_checkpoint_shards(tag_dir)
    return reshard(states, world_size, names)[rank], int(states[0]["world_size"])


# ---- one rank's shard <-> a live head and its optimizer -------------------------------------------------

def shard_state_dict(head: PartialFC, optimizer: Any = None) -> dict[str, Any]:
    """This rank's FC7 shard file content (CPU tensors); see FORMATS / CONTRACTS "FC7 shard".

    optimizer: ShardSGD or ShardAdamW (or None); its `row_state()` tensors are stored under ROW_STATE_KEYS
    ("momentum" is always present, None without SGD momentum) and its class name under "optimizer".
    """
    rows = optimizer.row_state() if optimizer is not None else {}
    group = optimizer.param_groups[0] if optimizer is not None else {}
    return {
        "format": SHARD_FORMAT,
        "weight": head.weight.detach().to("cpu", copy=True),
        "momentum": None,
        **{key: None if value is None else value.detach().to("cpu", copy=True) for key, value in rows.items()},
        "optimizer": None if optimizer is None else type(optimizer).__name__,
        # ShardSGD's step counter (the bf16 weight's stochastic-rounding counter; run-wide, the same on every rank)
        "optimizer_steps": getattr(optimizer, "step_count", None),
        "class_start": head.class_start,
        "num_local": head.num_local,
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "subcenters": head.subcenters,
        "rank": head.rank,
        "world_size": head.world_size,
        "hyper": {key: group.get(key) for key in ("lr", "momentum", "weight_decay", "sparse", "betas", "eps")
                  if key in group},
        "compute_dtype": head.compute_dtype,
        "interclass_filtering_threshold": head.interclass_filtering_threshold,
        # Extras (not needed to merge/reshard): the exact Partial FC sampler position and head settings.
        "sampler_rng": head.sampler_state(),
        "margin": head.margin.describe(),
        "margin_state": head.margin.state(),  # AdaFace's norm EMA (run-wide: the same on every rank)
        "scale": head.scale,
        "sample_rate": head.sample_rate,
        "parallel": head.parallel,
    }


def load_shard_state_dict(head: PartialFC, optimizer: Any, state: dict[str, Any]) -> None:
    """Validate `state` against this rank's head and load weight, optimizer rows, lr and the sampler state.

    The other hyper-parameters stay as constructed (the current config wins); lr is restored so a resumed
    schedule continues from the saved value. A missing `sampler_rng` (e.g. after resharding) re-seeds the
    sampler from (seed, rank). A shard written with another optimizer class (ShardSGD vs ShardAdamW) is
    refused when it carries that optimizer's state.
    """
    _check_one(state, f"FC7 shard (rank {head.rank})")  # the file itself: format, keys, shapes
    for key in ("num_classes", "embedding_size", "class_start", "num_local", "subcenters"):  # ...this rank's
        if int(state.get(key, 1)) != getattr(head, key):
            raise ValueError(
                f"FC7 shard {key}={state[key]} but this rank's head has {key}={getattr(head, key)} "
                f"(rank {head.rank} of {head.world_size}); a shard saved on world size "
                f"{state.get('world_size')} must be resharded (megaface convert fc7 --reshard, or `reshard` here)")
    weight = state["weight"]
    if tuple(weight.shape) != tuple(head.weight.shape):
        raise ValueError(f"FC7 shard weight shape {tuple(weight.shape)} != {tuple(head.weight.shape)}")
    with torch.no_grad():
        head.weight.copy_(weight)  # into the head's weight dtype (bf16 <- fp32 rounds to nearest)
    head.set_sampler_state(state.get("sampler_rng"))
    head.margin.load_state(state.get("margin_state"), f"FC7 shard (rank {head.rank})")
    if optimizer is None:
        return
    optimizer.zero_grad()
    saved_with, rows = state.get("optimizer"), {k: state.get(k) for k in ROW_STATE_KEYS}
    mine = set(optimizer.row_state())
    foreign = [k for k, v in rows.items() if v is not None and k not in mine]
    if foreign:
        raise ValueError(f"FC7 shard carries {foreign} of optimizer {saved_with or 'ShardSGD'} but this run uses "
                         f"{type(optimizer).__name__}; resume with the optim.name the checkpoint was trained with")
    optimizer.load_row_state(rows, f"FC7 shard (rank {head.rank})")
    if hasattr(optimizer, "step_count"):
        optimizer.step_count = int(state.get("optimizer_steps") or 0)
    lr = (state.get("hyper") or {}).get("lr")
    if lr is not None:
        optimizer.param_groups[0]["lr"] = float(lr)
