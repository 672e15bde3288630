"""An FC7 classifier found in a foreign checkpoint (OneFlow `fc7-weight`, MXNet `fc7_weight`) written as a
complete one-rank FC7 shard set that `megaface convert fc7 --merge/--reshard` and
`megaface.checkpoint.fc7_shards.load_checkpoint_shards / load_rank_shard` read:

    OUT/meta.json                      format megaface.checkpoint.v1, num_classes, embedding_size, world_size 1,
                                       class_ranges, parallel "model", source, "fc7_only": true
    OUT/fc7/shard_00000_of_00001.pt    megaface.checkpoint.fc7_shards.shard_state_dict layout (weight, momentum or None, ...)

There is no DeepSpeed part (`ds/`): the directory carries the classifier only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megaface.checkpoint import CHECKPOINT_FORMAT
from megaface.checkpoint.fc7_shards import SHARD_FORMAT
from megaface.checkpoint.layout import FC7_DIR, META_FILE, fc7_shard_file_name
from megaface.fileio import atomic_output_dir, torch_save


def write_fc7_shard_set(output: str | os.PathLike, weight: np.ndarray, momentum: np.ndarray | None,
                        num_classes: int | None, meta: dict[str, Any]) -> str:
    """Write ``weight`` [rows, D] (and its SGD momentum) as a one-rank shard set; returns a report line.

    ``num_classes`` below ``rows`` drops padding rows (OneFlow pads the class count for model parallelism).
    """
    rows, dim = weight.shape
    num_classes = rows if num_classes is None else int(num_classes)
    if not 0 < num_classes <= rows:
        raise ValueError(f"--num-classes {num_classes}: the FC7 has {rows} rows; pass a count in [1, {rows}]")
    if momentum is not None and momentum.shape != weight.shape:
        raise ValueError(f"FC7 momentum has shape {list(momentum.shape)}, the weight {list(weight.shape)}")
    tensor = torch.from_numpy(np.ascontiguousarray(weight[:num_classes], np.float32)).clone()
    shard = {
        "format": SHARD_FORMAT, "weight": tensor,
        "momentum": None if momentum is None else torch.from_numpy(
            np.ascontiguousarray(momentum[:num_classes], np.float32)).clone(),
        "class_start": 0, "num_local": num_classes, "num_classes": num_classes, "embedding_size": dim,
        "rank": 0, "world_size": 1, "sampler_rng": None, "parallel": "model",
        "hyper": {"lr": None, "momentum": None, "weight_decay": None, "sparse": None},
    }
    meta = {"format": CHECKPOINT_FORMAT, "iteration": 0, "num_classes": num_classes, "embedding_size": dim,
            "world_size": 1, "class_ranges": [[0, num_classes]], "parallel": "model", "fc7_only": True, **meta}
    with atomic_output_dir(output) as tmp:
        (tmp / FC7_DIR).mkdir()
        torch_save(shard, tmp / FC7_DIR / fc7_shard_file_name(0, 1))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    dropped = f", {rows - num_classes} padding rows dropped" if rows > num_classes else ""
    with_momentum = " + momentum" if momentum is not None else ""
    return f"wrote FC7 shard set {Path(output)} ({num_classes} classes x {dim}{with_momentum}{dropped})"
