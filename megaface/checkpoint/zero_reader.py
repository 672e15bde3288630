"""Read the fp32 weights of a DeepSpeed checkpoint directory (`<tag dir>/ds`) of any ZeRO stage, without
DeepSpeed's engine or process group.

Where DeepSpeed (0.19) keeps the weights:

| stage      | full-precision weights                                   | partitioning of the flat fp32 groups         |
|------------|----------------------------------------------------------|----------------------------------------------|
| 0 fp32     | `mp_rank_00_model_states.pt` "module"                    | none                                         |
| 0 bf16/fp16| same file, "optimizer": `fp32_groups` / `fp32_groups_flat`| none (one list / flat tensor per param group)|
| 1, 2       | `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`       | group flattened, params back to back, cut    |
|            | "single_partition_of_fp32_groups"                        | into W equal slices (tail padding)           |
| 3          | same files, "fp32_flat_groups"                           | every param cut into W slices of ceil(n/W)   |
|            |                                                          | elements; rank R holds its slice of each     |

Names and shapes of the trainable params come from "param_shapes" (one ordered dict per param group),
buffers (BatchNorm statistics) from "module". The file names are `megaface.checkpoint.layout`'s (`DS_*`).
DeepSpeed imports are needed only to unpickle its files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from megaface.checkpoint.layout import (
    DS_MODEL_STATES,
    DS_OPTIM_FILE,
    ds_optim_file_name,
    ds_zero3_model_file_name,
    load_torch_file,
)
from megaface.utils.progress import Progress

__all__ = ["detect_zero_stage", "read_fp32_state_dict"]


def _optim_files(ds_dir: Path, world_size: int | None = None) -> list[Path]:
    """The per-rank optimizer files in rank order. With `world_size`, exactly ranks 0..W-1 must be there:
    a missing or an extra rank is an error naming the file."""
    found: dict[int, Path] = {}
    for path in ds_dir.iterdir():
        match = DS_OPTIM_FILE.match(path.name)
        if match:
            found[int(match.group(2))] = path
    expected = range(world_size) if world_size is not None else range(max(found, default=-1) + 1)
    missing = [r for r in expected if r not in found]
    if missing and found:
        bf16 = next(iter(found.values())).name.startswith("bf16_")
        names = ", ".join(ds_optim_file_name(r, bf16) for r in missing)
        raise FileNotFoundError(f"{ds_dir}: missing the optimizer partitions of rank(s) {missing} ({names}); "
                                f"every rank of the saving job writes one")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{ds_dir}: extra optimizer partition file(s) {[found[r].name for r in extra]} for a "
                         f"job of {world_size} ranks (dp_world_size in {DS_MODEL_STATES}); files of two "
                         "saves mixed?")
    return [found[r] for r in sorted(found)]


def detect_zero_stage(ds_dir: str | Path) -> int:
    """The ZeRO stage a DeepSpeed checkpoint directory was written with (from its file names/contents)."""
    ds_dir = Path(ds_dir)
    if not ds_dir.is_dir():
        raise FileNotFoundError(f"{ds_dir} does not exist (expected the DeepSpeed part of a checkpoint)")
    if (ds_dir / ds_zero3_model_file_name(0)).is_file():
        return 3
    optim = _optim_files(ds_dir)
    if not optim:
        return 0
    osd = load_torch_file(optim[0], "DeepSpeed optimizer partitions", weights_only=False)["optimizer_state_dict"]
    return int(osd["zero_stage"])


def _model_states(ds_dir: Path, stage: int, rank: int = 0) -> dict[str, Any]:
    name = ds_zero3_model_file_name(rank) if stage == 3 else DS_MODEL_STATES
    state = load_torch_file(ds_dir / name, "DeepSpeed model states", weights_only=False)
    if not isinstance(state, dict) or "module" not in state:
        raise ValueError(f"{ds_dir / name}: no 'module' entry; not a DeepSpeed model-states file")
    return state


def _load_partitions(ds_dir: Path, key: str, world_size: int, progress: str | None = None
                     ) -> list[list[torch.Tensor]]:
    """Per rank, the list (one per param group) of flat fp32 partitions stored under `key`."""
    files = _optim_files(ds_dir, world_size)
    parts = []
    # reading the partitions is the long part (a rank's file holds its share of the optimizer state)
    with Progress(progress or "", len(files), "files", enabled=progress is not None) as bar:
        for path in files:
            osd = load_torch_file(path, "DeepSpeed optimizer partitions", weights_only=False)["optimizer_state_dict"]
            if key not in osd:
                raise ValueError(f"{path}: no '{key}' (found {sorted(osd)}); not the ZeRO stage its siblings say")
            parts.append([t.detach().float() for t in osd[key]])
            bar.update(1)
    return parts


def _params_zero12(groups: list[dict[str, torch.Size]], parts: list[list[torch.Tensor]],
                   ds_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(groups):
        flat = torch.cat([rank_parts[g] for rank_parts in parts])
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if offset + numel > flat.numel():
                raise ValueError(f"{ds_dir}: param group {g} holds {flat.numel()} values, too few for "
                                 f"'{name}' {tuple(shape)} at offset {offset}; partitions are incomplete")
            out[name] = flat[offset:offset + numel].view(shape).clone()
            offset += numel
    return out


def _params_zero3(groups: list[dict[str, torch.Size]], parts: list[list[torch.Tensor]],
                  ds_dir: Path) -> dict[str, torch.Tensor]:
    world_size = len(parts)
    out: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(groups):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / world_size)  # each rank's slice, zero-padded on the last ranks
            pieces = [rank_parts[g][offset:offset + per_rank] for rank_parts in parts]
            if any(p.numel() != per_rank for p in pieces):
                raise ValueError(f"{ds_dir}: param group {g} ends before '{name}' {tuple(shape)}; "
                                 "partitions are incomplete")
            out[name] = torch.cat(pieces)[:numel].view(shape).clone()
            offset += per_rank
    return out


def _params_zero0(model_states: dict[str, Any], buffers: set[str], ds_dir: Path) -> dict[str, torch.Tensor]:
    """Stage 0: fp32 masters from a bf16/fp16 optimizer when present, else the (fp32) module weights."""
    module = model_states["module"]
    names = [k for k in module if k not in buffers]
    optim = model_states.get("optimizer") or {}
    if "fp32_groups" in optim:
        masters = [t for group in optim["fp32_groups"] for t in group]
    elif "fp32_groups_flat" in optim:
        masters = [torch.cat([t.reshape(-1) for t in optim["fp32_groups_flat"]])]
    else:
        return {k: module[k] for k in names}
    flat = torch.cat([t.detach().float().reshape(-1) for t in masters])
    total = sum(module[k].numel() for k in names)
    if flat.numel() != total:
        raise ValueError(f"{ds_dir / DS_MODEL_STATES}: the optimizer's fp32 master weights hold {flat.numel()} "
                         f"values but the module's parameters {total}; cannot map them to names")
    out, offset = {}, 0
    for k in names:
        n = module[k].numel()
        out[k] = flat[offset:offset + n].view(module[k].shape).clone()
        offset += n
    return out


def _frozen(model_states: list[dict[str, Any]], stage: int) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad=False (not in the optimizer): whole in stage 1/2, sliced in stage 3."""
    shapes = model_states[0].get("frozen_param_shapes") or {}
    out = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if stage == 3:
            flat = torch.cat([ms["frozen_param_fragments"][name].reshape(-1) for ms in model_states])
        else:
            flat = model_states[0]["frozen_param_fragments"][name].reshape(-1)
        out[name] = flat[:numel].float().view(shape).clone()
    return out


def read_fp32_state_dict(ds_dir: str | Path, progress: str | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, info) of the module saved in `ds_dir`: params in fp32 (from the fp32 master copy when one
    exists), buffers as saved, keys and order as `module.state_dict()`. info: zero_stage, world_size, ...
    `progress`: label of a console progress display over the partition files (None: none).
    """
    ds_dir = Path(ds_dir)
    stage = detect_zero_stage(ds_dir)
    first = _model_states(ds_dir, stage)
    world_size = int(first.get("dp_world_size", 1))
    buffers = set(first.get("buffer_names") or [])
    if stage == 0:
        params = _params_zero0(first, buffers, ds_dir)
    else:
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        parts = _load_partitions(ds_dir, key, world_size, progress)
        reader = _params_zero3 if stage == 3 else _params_zero12
        params = reader(list(first["param_shapes"]), parts, ds_dir)
        all_states = [first] + [_model_states(ds_dir, 3, r) for r in range(1, world_size)] if stage == 3 \
            else [first]
        params.update(_frozen(all_states, stage))
    for name, source in (first.get("shared_params") or {}).items():
        params[name] = params[source]
    module = first["module"]
    state: dict[str, torch.Tensor] = {}
    for key, value in module.items():
        if key in params:
            state[key] = params[key].float()
        elif key in buffers:
            state[key] = value.detach().clone()
        else:
            raise ValueError(f"{ds_dir}: '{key}' is neither a buffer nor found in the fp32 partitions; the "
                             "checkpoint is incomplete or from an unsupported DeepSpeed layout")
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"{ds_dir}: fp32 partitions hold {missing[:5]} that the saved module lacks")
    info = {"zero_stage": stage, "world_size": world_size, "ds_version": first.get("ds_version"),
            "global_steps": first.get("global_steps")}
    return state, info
