"""`megaface convert fc7`: merge a checkpoint's FC7 shards into one matrix, or copy the checkpoint with its
shards rewritten for another world size. The format itself lives in `megaface.checkpoint.fc7_shards`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from megaface.checkpoint import DS_DIR, FC7_DIR, META_FILE, fc7_shard_file_name, read_meta
from megaface.checkpoint.fc7_shards import (
    MERGED_FORMAT,
    load_checkpoint_shards,
    merge_shards,
    split_merged,
)
from megaface.checkpoint.integrity import FILES_KEY, digests, list_files
from megaface.fileio import atomic_output_dir, atomic_output_file, torch_save
from megaface.utils.progress import Progress


def _check_meta(meta: dict[str, Any], merged: dict[str, Any], tag_dir: Path) -> None:
    for key in ("num_classes", "embedding_size"):
        if key in meta and int(meta[key]) != int(merged[key]):
            raise ValueError(f"{tag_dir / META_FILE}: {key}={meta[key]} but the FC7 shards have "
                             f"{key}={merged[key]}; the shards belong to another run")


def _data_parallel_fc7(tag_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A replicated FC7 (parallel="data") is the engine's `head.weight`; its momentum is not extracted."""
    from megaface.checkpoint.backbone import strip_wrappers
    from megaface.checkpoint.zero_reader import read_fp32_state_dict

    state = strip_wrappers(read_fp32_state_dict(tag_dir / DS_DIR)[0])
    if "head.weight" not in state:
        raise ValueError(f"{tag_dir / DS_DIR}: no 'head.weight' although meta.json says parallel='data' "
                         f"(found e.g. {list(state)[:4]})")
    weight, k = state["head.weight"], int(meta.get("subcenters", 1))  # K rows per class (sub-center ArcFace)
    classes = int(weight.shape[0]) // k
    return {"format": MERGED_FORMAT, "weight": weight, "momentum": None, "num_classes": classes,
            "embedding_size": int(weight.shape[1]), "source_world_size": int(meta.get("world_size", 1)),
            "class_ranges": [[0, classes]], "parallel": "data", "hyper": None, "subcenters": k}


def merge_checkpoint(tag_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the merged FC7 of a checkpoint to `output` (torch file; atomic) and return its path.

    A data-parallel head (parallel="data") is taken from the DeepSpeed checkpoint (weight only)."""
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
        torch_save(merged, tmp)
    return Path(output)


def reshard_checkpoint(tag_dir: str | os.PathLike, world_size: int, output: str | os.PathLike) -> Path:
    """Copy a checkpoint to `output` with its FC7 shards rewritten for `world_size` ranks.

    Everything else (DeepSpeed files, trainer state) is copied unchanged; meta.json gets the new
    `class_ranges` plus `fc7_world_size` and `fc7_resharded_from`. `world_size` in meta.json stays the
    world size the DeepSpeed part was saved at (its partitions are not rewritten).
    """
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
    # file by file (the DeepSpeed partitions are the bulk of the bytes), so that progress can be shown
    copies = sorted(p.relative_to(tag_dir) for item in tag_dir.iterdir() if item.name not in (FC7_DIR, META_FILE)
                    for p in ([item, *item.rglob("*")] if item.is_dir() else [item]))
    with atomic_output_dir(output) as tmp, Progress("fc7 reshard", len(copies) + len(shards), "files") as bar:
        for rel in copies:
            if (tag_dir / rel).is_dir():
                (tmp / rel).mkdir()
                shutil.copystat(tag_dir / rel, tmp / rel)
            else:
                shutil.copy2(tag_dir / rel, tmp / rel)
            bar.update(1)
        (tmp / FC7_DIR).mkdir()
        for shard in shards:
            torch_save(shard, tmp / FC7_DIR / fc7_shard_file_name(shard["rank"], world_size))
            bar.update(1)
        if FILES_KEY in meta:  # the copy's own digests (the shard files are new)
            meta[FILES_KEY] = digests(tmp, list_files(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(output)
