"""Backbone files and checkpoint discovery (the parts eval, convert and export rely on).

Checkpoint layout (written by `megaface.trainer.checkpointing`), under `OUTPUT/checkpoints/`:

    latest                      text: the newest complete tag (rewritten atomically after a save)
    step_00001000/              one complete checkpoint (renamed from step_00001000.tmp/ when complete)
        meta.json               format megaface.checkpoint.v1: iteration, network, embedding_size, num_classes,
                                world_size, class_ranges, zero_stage, precision, parallel, normalize,
                                config, ds_config, megaface version
        ds/                     DeepSpeed engine.save_checkpoint(..., tag="ds") (backbone [+ data-parallel FC7])
        fc7/shard_00000_of_00002.pt   model-parallel FC7 rows + momentum (megaface.head.shard_state_dict)
        trainer/rank_00000.pt   loader position, RNG states, counters, lr schedule state

A backbone file is a plain `state_dict` (.pt, with a sidecar `<file>.json` holding the meta) or a
.safetensors file (meta in its header under the key "megaface", and the sidecar too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from megaface.fileio import atomic_output_file

CHECKPOINT_FORMAT = "megaface.checkpoint.v1"
BACKBONE_FORMAT = "megaface.backbone.v1"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TAG_PREFIX = "step_"


def tag_for(iteration: int) -> str:
    return f"{TAG_PREFIX}{iteration:08d}"


# ---- atomic writes --------------------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that readers see either the old or the new content, never a partial file."""
    with atomic_output_file(path, fsync=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_output_file(path) as tmp:
        torch.save(obj, tmp)


# ---- backbone files -------------------------------------------------------------------------------------

def save_backbone_file(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a backbone (fp32 state_dict) + its meta atomically; `.safetensors` or anything else as torch .pt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": BACKBONE_FORMAT, **meta}
    # clone: safetensors refuses shared storage, and the caller's tensors must not be touched
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_output_file(path) as tmp:
            save_file(tensors, tmp, metadata={"megaface": json.dumps(meta)})
    else:
        atomic_torch_save(tensors, path)
    atomic_write_text(Path(f"{path}.json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_backbone_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a backbone file; meta from the safetensors header or the sidecar (or {})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {str(path)!r} does not exist")
    meta: dict[str, Any] = {}
    sidecar = Path(f"{path}.json")
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        if "megaface" in header:
            meta = {**json.loads(header["megaface"]), **meta}
        return state, meta
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (mapping of tensors), found {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state, meta


# ---- checkpoint discovery ---------------------------------------------------------------------------------

def _is_tag_dir(path: Path) -> bool:
    return (path / "meta.json").is_file() and not path.name.endswith(".tmp")


def find_checkpoint(path_or_latest: str | os.PathLike | None, output_dir: str | os.PathLike | None = None) -> Path:
    """Resolve 'latest' (under output_dir), an output dir, a checkpoints dir or a tag dir to a complete tag dir."""
    if path_or_latest in (None, "", LATEST):
        if output_dir is None:
            raise ValueError("resume 'latest' needs the run's output directory (--output DIR)")
        return _latest_in(Path(output_dir) / CHECKPOINTS_DIR)
    path = Path(path_or_latest)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if _is_tag_dir(path):
        return path
    if path.name.endswith(".tmp"):
        raise ValueError(f"{path} is an incomplete checkpoint (a save was interrupted); use the one in 'latest'")
    if (path / CHECKPOINTS_DIR).is_dir():
        return _latest_in(path / CHECKPOINTS_DIR)
    return _latest_in(path)


def _latest_in(ckpt_dir: Path) -> Path:
    marker = ckpt_dir / LATEST
    if marker.is_file():
        tag = marker.read_text(encoding="utf-8").strip()
        if _is_tag_dir(ckpt_dir / tag):
            return ckpt_dir / tag
    # no (or a stale) marker: fall back to the newest complete tag directory
    tags = sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if _is_tag_dir(p)) if ckpt_dir.is_dir() else []
    if not tags:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir} (expected '{LATEST}' or "
                                f"{TAG_PREFIX}NNNNNNNN/meta.json)")
    return tags[-1]


def read_meta(tag_dir: str | os.PathLike) -> dict[str, Any]:
    meta_path = Path(tag_dir) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: {tag_dir} is not a megaface checkpoint")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return meta


def checkpoint_backbone_state(tag_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The fp32 backbone state_dict of a checkpoint: ZeRO partitions consolidated, and the fp32 master
    weights (not the rounded bf16/fp16 module copy) wherever DeepSpeed kept them."""
    from megaface.convert.consolidate import strip_prefixes
    from megaface.convert.zero_reader import read_fp32_state_dict

    read_meta(tag_dir)  # a clear error for a directory that is no megaface checkpoint
    raw, _ = read_fp32_state_dict(Path(tag_dir) / "ds")
    return {k: v.float() if v.is_floating_point() else v for k, v in strip_prefixes(raw).items()}


def resolve_network(meta: dict[str, Any], network: str | None, source: str | os.PathLike) -> str:
    """The network a stored backbone is: the one its meta names, which a requested name must match."""
    stored = meta.get("network")
    if network is not None and stored is not None and network != stored:
        raise ValueError(f"{source} holds a '{stored}' backbone, not '{network}': pass --network {stored} "
                         "(or drop --network), or the matching checkpoint")
    name = network or stored
    if name is None:
        raise ValueError(f"{source} has no meta naming its network: pass the network name "
                         "(e.g. --network iresnet50)")
    return name


def load_backbone(path: str | os.PathLike, network: str | None = None,
                  map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the backbone stored at `path` (output dir, checkpoints dir, tag dir or backbone file) in eval mode.

    `network` is required when the file carries no meta; when both exist they must agree.
    """
    from megaface.models import build_model

    path = Path(path)
    if path.is_file():
        state, meta = read_backbone_file(path)
    else:
        tag_dir = find_checkpoint(path)
        meta = read_meta(tag_dir)
        state = checkpoint_backbone_state(tag_dir)
    name = resolve_network(meta, network, path)
    # build_options: constructor settings a converted file needs (e.g. bn_eps of an arcface_torch import)
    model = build_model(name, embedding_size=meta.get("embedding_size"), **meta.get("build_options", {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit network '{name}' "
                         f"(embedding_size={meta.get('embedding_size')}): {str(err)[:400]}") from None
    return model.to(map_location).eval(), meta
