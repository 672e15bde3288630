"""`megaface convert consolidate`: one plain fp32 backbone file from a checkpoint of any ZeRO stage.

The output loads with `torch.load` (or safetensors) straight into `megaface.models.build_model(network)`;
no DeepSpeed needed. The fp32 master weights are read from the DeepSpeed partitions by
`megaface.checkpoint.zero_reader` (tested equal to DeepSpeed's own zero_to_fp32 for ZeRO 1-3).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megaface.checkpoint import DS_DIR, META_FILE, read_meta, resolve_network, strip_prefixes
from megaface.checkpoint.integrity import open_checkpoint
from megaface.checkpoint.zero_reader import read_fp32_state_dict

__all__ = ["check_architecture", "consolidate_state_dict", "consolidate"]


def check_architecture(state: dict[str, torch.Tensor], network: str, embedding_size: int | None,
                       source: str) -> None:
    """Raise ValueError naming `source` unless `state` fits `network` key for key and shape for shape."""
    from megaface.models import build_model

    with torch.device("meta"):  # shapes only: no memory for the weights, no init cost
        reference = build_model(network, embedding_size=embedding_size).state_dict()
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in reference.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
        raise ValueError(f"{source}: the weights are not a '{network}' backbone (embedding_size="
                         f"{embedding_size}): {'; '.join(parts)}. Pass the right --network, or this is a "
                         "checkpoint of another architecture")


def consolidate_state_dict(path: str | os.PathLike, network: str | None = None, verify: bool = True,
                           progress: str | None = None
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 backbone state_dict, backbone meta) of the checkpoint at `path` (output/checkpoints/tag dir).

    `network` overrides the name in meta.json (must be given when the meta has none); the weights are
    checked against that network's architecture. `verify`: check meta.json's sha256 digests first;
    `progress`: label of a console progress display.
    """
    tag_dir = open_checkpoint(path, verify=verify)
    meta = read_meta(tag_dir)
    raw, info = read_fp32_state_dict(tag_dir / DS_DIR, progress)
    state = strip_prefixes(raw)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    name = resolve_network(meta, network, tag_dir / META_FILE)
    check_architecture(state, name, meta.get("embedding_size"), str(tag_dir / DS_DIR))
    if "zero_stage" in meta and int(meta["zero_stage"]) != info["zero_stage"]:
        raise ValueError(f"{tag_dir / META_FILE} says ZeRO stage {meta['zero_stage']} but {tag_dir / DS_DIR} "
                         f"holds a ZeRO-{info['zero_stage']} checkpoint; the directory was mixed up")
    backbone_meta = {
        "network": name,
        "embedding_size": meta.get("embedding_size"),
        "normalize": meta.get("normalize"),
        "num_classes": meta.get("num_classes"),
        "iteration": meta.get("iteration"),
        "source": str(tag_dir),
        "zero_stage": info["zero_stage"],
        "precision": meta.get("precision"),
        "saved_world_size": info["world_size"],
    }
    return state, backbone_meta


def consolidate(path: str | os.PathLike, output: str | os.PathLike, network: str | None = None,
                verify: bool = True) -> Path:
    """Write the fp32 backbone of the checkpoint at `path` to `output` (.pt or .safetensors, + sidecar .json)."""
    from megaface.checkpoint import save_backbone_file

    output = Path(output)
    if output.suffix not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"output {output} must end in .pt, .pth or .safetensors")
    state, meta = consolidate_state_dict(path, network, verify=verify, progress="consolidate")
    return save_backbone_file(output, state, meta)
