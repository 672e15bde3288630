"""OneFlow snapshots of the InsightFace-in-OneFlow networks <-> megaface backbones (no OneFlow needed).

A snapshot is a directory with one sub-directory per variable, named like InsightFace's MXNet parameters
with the last '_' turned into '-' (`conv0-weight`, `stage1_unit1_bn1-moving_variance`, `relu0-alpha`):

    SNAPSHOT/<variable>/out     raw little-endian values in C order (float32: data_type kFloat)
    SNAPSHOT/<variable>/meta    newer OneFlow only: text VariableMetaInfo, `shape { dim: 64 dim: 3 ... }`
                                and `data_type: kFloat`; without it the shape comes from the network

`<variable>-momentum` directories and `System-*` entries (the train-step counter) are optimizer state and
are skipped; `fc7-weight` (+ `fc7-weight-momentum`) becomes an FC7 shard set (`fc7_import`). `fc1-gamma`,
which OneFlow's scale-less fc1 does not have but oneflow_face's MXNet converter (tools/model_convert at
b144e82) copies from MXNet's fix_gamma fc1, is accepted and ignored.

Export writes what OneFlow's `flow.checkpoint.save` writes for the oneflow_face networks: per variable `out`
and a text `meta` (`shape { dim: ... }`, `data_type: kFloat`), PReLU slopes `[C, 1, 1]`, no `fc1-gamma`,
then an empty `snapshot_done`. oneflow_face's OneFlow -> MXNet converter reads it (tested).

Padding: the seed's networks use `padding="same"` for their 3x3 convolutions, which OneFlow resolves to
SAME_LOWER (any odd total padding goes *before* the data). For a stride-2 3x3 convolution on the even sizes
of a 112x112 input (112, 56, 28, 14) that is 1 before and 0 after, which computes exactly what megaface's
symmetric padding of 1 computes (the last window never reaches the bottom/right padding); stride-1 3x3
convolutions pad 1/1. So imported OneFlow models need no build option (tests/unit/test_convert_oneflow.py checks
this against a SAME_LOWER reference, and that SAME_UPPER would differ).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from megaface.convert.insightface_graph import layer_table
from megaface.convert.insightface_layers import (
    ONEFLOW,
    embedding_size_of,
    from_megaface,
    source_shapes,
    to_megaface,
)
from megaface.fileio import atomic_output_dir

DATA_TYPES = {"kFloat": np.float32, "kDouble": np.float64, "kFloat16": np.float16, "kInt8": np.int8,
              "kInt32": np.int32, "kInt64": np.int64}
_MOMENTUM = "-momentum"
_FC7 = "fc7-weight"


def _read_meta(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    text = path.read_text(encoding="utf-8", errors="replace")
    dims = tuple(int(d) for d in re.findall(r"\bdim\s*:\s*(-?\d+)", text))
    match = re.search(r"\bdata_type\s*:\s*(\w+)", text)
    name = match.group(1) if match else "kFloat"
    if name not in DATA_TYPES:
        raise ValueError(f"{path}: data_type {name!r} is not one of {sorted(DATA_TYPES)}")
    return dims, np.dtype(DATA_TYPES[name])


def read_variable(var_dir: Path, shape: tuple[int, ...] | None) -> np.ndarray:
    """One variable: the shape from its `meta` when present, else ``shape`` (None: flat)."""
    out = var_dir / "out"
    if not out.is_file():
        raise FileNotFoundError(f"{out} does not exist: {var_dir.name!r} is no OneFlow variable directory "
                                "(expected <variable>/out)")
    dtype = np.dtype(np.float32)
    if (var_dir / "meta").is_file():
        shape, dtype = _read_meta(var_dir / "meta")
    raw = out.read_bytes()
    count = len(raw) // dtype.itemsize
    expected = int(np.prod(shape)) if shape is not None else count
    if len(raw) != expected * dtype.itemsize:
        raise ValueError(f"{out}: {len(raw)} bytes, but shape {list(shape or ())} of {dtype.name} needs "
                         f"{expected * dtype.itemsize}: the file is truncated or belongs to another network")
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(np.float32)
    return array.reshape(shape) if shape is not None else array


def read_snapshot(snapshot_dir: str | os.PathLike, network: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(backbone variables, fc7 variables) of a snapshot; optimizer state and System-* entries skipped."""
    root = Path(snapshot_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected a OneFlow snapshot: one sub-directory "
                                "per variable)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    kept = [n for n in names if not n.startswith("System-") and not n.endswith(_MOMENTUM)]
    fc7 = {n: read_variable(root / n, None) for n in (_FC7, _FC7 + _MOMENTUM) if n in names}
    backbone_names = [n for n in kept if n != _FC7]
    beta = "fc1-beta"
    if beta not in backbone_names:
        raise ValueError(f"{root}: no variable {beta!r}: not a snapshot of an InsightFace OneFlow network "
                         f"(found e.g. {backbone_names[:5]})")
    embedding_size = embedding_size_of({beta: read_variable(root / beta, None)}, network, ONEFLOW, str(root))
    shapes = source_shapes(network, embedding_size, ONEFLOW)
    arrays = {}
    for name in backbone_names:
        shape = shapes.get(name)
        try:
            arrays[name] = read_variable(root / name, shape)
        except ValueError:
            if (root / name / "meta").is_file() or shape is None:
                raise
            arrays[name] = read_variable(root / name, None)  # reported as a shape mismatch with its size
    return arrays, fc7


def _fc7_matrix(fc7: dict[str, np.ndarray], embedding_size: int, root: Path) -> tuple[np.ndarray, np.ndarray | None]:
    weight = fc7[_FC7]
    if weight.ndim == 1:
        if weight.size % embedding_size:
            raise ValueError(f"{root / _FC7}: {weight.size} values are not a multiple of embedding_size "
                             f"{embedding_size}")
        weight = weight.reshape(-1, embedding_size)
    momentum = fc7.get(_FC7 + _MOMENTUM)
    return weight, None if momentum is None else momentum.reshape(weight.shape)


def _drop_fixed_gamma(arrays: dict[str, np.ndarray], network: str, embedding_size: int, root: Path) -> str | None:
    """Remove the embedding BatchNorm's `fc1-gamma` if present; returns a note. OneFlow's fc1 has no scale
    (scale=False), but oneflow_face's MXNet converter copies MXNet's fc1_gamma, which MXNet itself ignores
    (fix_gamma=True), into the snapshot: accepted and ignored, as the MXNet import ignores it."""
    layer = next(layer for layer in layer_table(network, embedding_size) if layer.kind == "embedding")
    name = f"{layer.name}{ONEFLOW.sep}gamma"
    if name not in arrays:
        return None
    gamma = arrays.pop(name)
    if gamma.size != embedding_size:
        raise ValueError(f"{root / name}: {gamma.size} values, expected {embedding_size} (the fix_gamma scale of "
                         f"{layer.name!r}, one per embedding dimension); the snapshot is damaged")
    return (f"{name} ignored: the fix_gamma scale that oneflow_face's MXNet converter copies; OneFlow's "
            f"{layer.name} has no scale and MXNet fixes it at 1")


def import_oneflow(snapshot_dir: str | os.PathLike, output: str | os.PathLike, network: str,
                   fc7_output: str | os.PathLike | None = None, num_classes: int | None = None) -> str:
    """Convert a OneFlow snapshot into a megaface backbone file (+ FC7 shard set); returns the report text."""
    from megaface.checkpoint import save_backbone_file

    layer_table(network, 1)  # unknown network: fail before reading anything
    root = Path(snapshot_dir)
    arrays, fc7 = read_snapshot(root, network)
    dropped = _drop_fixed_gamma(arrays, network, embedding_size_of(arrays, network, ONEFLOW, str(root)), root)
    state, embedding_size, notes = to_megaface(arrays, network, ONEFLOW, str(root))
    notes += [dropped] if dropped else []
    meta = {"network": network, "embedding_size": embedding_size, "source": "oneflow", "source_file": str(root),
            "build_options": {}, "normalize": "oneflow"}
    out = save_backbone_file(output, state, meta)
    summary = f"{network} (embedding_size={embedding_size}): {len(arrays)} OneFlow variables matched"
    lines = [f"wrote megaface backbone {out}", summary] + [f"  - {note}" for note in notes]
    if fc7:
        from megaface.convert.fc7_import import write_fc7_shard_set

        weight, momentum = _fc7_matrix(fc7, embedding_size, root)
        target = fc7_output or Path(output).with_name(f"{Path(output).stem}_fc7")
        lines.append(write_fc7_shard_set(target, weight, momentum, num_classes,
                                         {"network": network, "source": str(root)}))
    return "\n".join(lines)


def _meta_text(shape: tuple[int, ...]) -> str:
    dims = "".join(f"  dim: {d}\n" for d in shape)
    return f"shape {{\n{dims}}}\ndata_type: kFloat\n"


def export_oneflow(src: str | os.PathLike, output: str | os.PathLike, network: str | None = None,
                   verify: bool = True) -> str:
    """Write a megaface checkpoint/backbone as a OneFlow snapshot directory (out + meta per variable)."""
    from megaface.checkpoint import load_backbone

    model, meta = load_backbone(src, network=network, verify=verify)
    state = model.state_dict()
    arrays = from_megaface(state, model.network_name, ONEFLOW)
    warnings = []
    if meta.get("build_options"):
        warnings.append(f"the backbone runs with build options {meta['build_options']}; the OneFlow networks "
                        "hard-code their BatchNorm eps, so outputs there differ slightly")
    embedding_gamma = state["features.weight" if model.network_name.startswith("iresnet") else "features.layers.3.weight"]
    if not bool((embedding_gamma == 1).all()):
        warnings.append("the embedding BatchNorm scale is not 1; OneFlow's fc1 has no scale and drops it")
    with atomic_output_dir(output) as tmp:
        for name, value in arrays.items():
            (tmp / name).mkdir()
            (tmp / name / "out").write_bytes(np.ascontiguousarray(value, "<f4").tobytes())
            (tmp / name / "meta").write_text(_meta_text(value.shape), encoding="utf-8")
        (tmp / "snapshot_done").write_text("", encoding="utf-8")
    return "\n".join([f"wrote OneFlow snapshot {output} ({model.network_name}, {len(arrays)} variables)"]
                     + [f"  - warning: {w}" for w in warnings])
