"""Backbone files (.pt with a sidecar .json, or .safetensors) and the backbone inside a checkpoint.

A backbone file is a plain `state_dict` (.pt, with a sidecar `<file>.json` holding the meta) or a
.safetensors file (meta in its header under the key "megaface", and the sidecar too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megaface.checkpoint.filetype import require_weight_file
from megaface.checkpoint.integrity import open_checkpoint, sha256_file, skipped_verification, verify_backbone_file
from megaface.checkpoint.layout import DS_DIR, load_torch_file, read_meta, sidecar_path
from megaface.checkpoint.zero_reader import read_fp32_state_dict
from megaface.fileio import atomic_output_file, atomic_torch_save, atomic_write_text, save_bytes

if TYPE_CHECKING:
    from megaface.models.layers import Backbone

BACKBONE_FORMAT = "megaface.backbone.v1"
WEIGHTS_SHA256 = "weights_sha256"  # sidecar key: the sha256 of the weights file it describes
# Wrappers that may sit around the backbone inside the engine: torch.compile, (Distributed)DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# DataParallelFace (megaface.train.build, parallel="data") holds the backbone next to the replicated FC7.
_BACKBONE_PREFIX = "backbone."


def save_backbone_file(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a backbone (fp32 state_dict) + its meta atomically; `.safetensors` or anything else as torch .pt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": BACKBONE_FORMAT, **meta}
    # clone: safetensors refuses shared storage, and the caller's tensors must not be touched
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        # serialized here and written by Python: safetensors' own file writer reports a full disk as a
        # SafetensorError without errno
        with atomic_output_file(path) as tmp:
            save_bytes(tmp, save(tensors, metadata={"megaface": json.dumps(meta)}))
    else:
        atomic_torch_save(tensors, path)
    # the digest readers check (`read_backbone_file`), computed while the file is still in the page cache
    meta[WEIGHTS_SHA256] = sha256_file(path)
    atomic_write_text(sidecar_path(path), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_backbone_file(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a backbone file; meta from the safetensors header or the sidecar (or {}).

    With `verify` the file must match the sha256 its sidecar recorded (files without one are let through).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone file {str(path)!r} does not exist")
    require_weight_file(path, "a backbone file (.pt state_dict or .safetensors)")
    meta: dict[str, Any] = {}
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    expected = meta.pop(WEIGHTS_SHA256, None)
    if verify:
        verify_backbone_file(path, expected)
    elif expected is not None:
        skipped_verification(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        if "megaface" in header:
            meta = {**json.loads(header["megaface"]), **meta}
        return state, meta
    state = load_torch_file(path, "a backbone file (a state_dict of tensors)")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (mapping of tensors), found {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state, meta



def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (`module.`, `_orig_mod.`) shared by every key."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's own keys: `strip_wrappers`, then keep only `backbone.*` (dropping the data-parallel
    head) when the engine held a backbone + head container."""
    state = strip_wrappers(state)
    if any(k.startswith(_BACKBONE_PREFIX) for k in state):
        state = {k[len(_BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(_BACKBONE_PREFIX)}
    return state


def checkpoint_backbone_state(tag_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The fp32 backbone state_dict of a checkpoint: ZeRO partitions consolidated, and the fp32 master
    weights (not the rounded bf16/fp16 module copy) wherever DeepSpeed kept them."""
    read_meta(tag_dir)  # a clear error for a directory that is no megaface checkpoint
    raw, _ = read_fp32_state_dict(Path(tag_dir) / DS_DIR)
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
                  map_location: str | torch.device = "cpu", verify: bool = True
                  ) -> tuple[Backbone, dict[str, Any]]:
    """Build the backbone stored at `path` (output dir, checkpoints dir, tag dir or backbone file) in eval mode.

    `network` is required when the file carries no meta; when both exist they must agree. `verify`: check the
    sha256 digests (meta.json's, a backbone sidecar's) first; without it a warning says they were skipped.
    """
    from megaface.models import build_model

    path = Path(path)
    if path.is_file():
        state, meta = read_backbone_file(path, verify=verify)
    else:
        tag_dir = open_checkpoint(path, verify=verify)
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
