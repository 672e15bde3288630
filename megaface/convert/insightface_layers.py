"""Parameters of InsightFace's MXNet / OneFlow networks <-> megaface backbone state_dicts.

The layer table comes from `insightface_graph` (megaface key <-> InsightFace layer name); this module adds
how each framework spells a layer's parameters and the conversions both ways, with exact checking:
every expected parameter present, none left over, every shape right, or a ValueError naming them.

| megaface field             | MXNet (`_`)             | OneFlow (`-`)                  |
|----------------------------|-------------------------|--------------------------------|
| conv `.weight`             | `<name>_weight`         | `<name>-weight`                |
| BN `.weight/.bias`         | `_gamma`, `_beta`       | `-gamma`, `-beta`              |
| BN `.running_mean/_var`    | `_moving_mean`, `_moving_var` | `-moving_mean`, `-moving_variance` |
| PReLU `.weight` [C]        | `_gamma` [C]            | `-alpha` [C, 1, 1]             |
| linear `.weight/.bias`     | `_weight` [D, F], `_bias` | `-weight` [D, F], `-bias`    |
| embedding BN `.weight`     | `fc1_gamma` (fix_gamma: ignored) | absent (scale=False)  |

MobileFaceNet's `pre_fc1` bias (megaface has none) is folded into `fc1`'s moving mean: in eval mode
BN(Wx + b) with mean m equals BN(Wx) with mean m - b, exactly. Export writes a zero bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from megaface.convert.insightface_graph import Layer, layer_table

_SHOWN = 8


@dataclass(frozen=True)
class Naming:
    """How a framework spells parameter names (``<layer><sep><suffix>``) and shapes."""

    framework: str
    sep: str
    moving_var: str
    prelu: str
    prelu_trailing: tuple[int, ...]  # OneFlow keeps PReLU slopes as [C, 1, 1]
    embedding_gamma: bool            # whether the final BN stores a (fixed) gamma at all

    def fields(self, kind: str) -> list[tuple[str | None, str]]:
        """(megaface field or None for a folded parameter, suffix) of one layer kind."""
        bn: list[tuple[str | None, str]] = [("weight", "gamma"), ("bias", "beta"),
                                            ("running_mean", "moving_mean"), ("running_var", self.moving_var)]
        table: dict[str, list[tuple[str | None, str]]] = {
            "conv": [("weight", "weight")],
            "bn": bn,
            "embedding": bn if self.embedding_gamma else bn[1:],
            "prelu": [("weight", self.prelu)],
            "fc": [("weight", "weight"), ("bias", "bias")],
            "fc_nobias": [("weight", "weight"), (None, "bias")],
        }
        return table[kind]

    def name(self, layer: Layer, suffix: str) -> str:
        return f"{layer.name}{self.sep}{suffix}"


MXNET = Naming("MXNet", "_", "moving_var", "gamma", (), True)
ONEFLOW = Naming("OneFlow", "-", "moving_variance", "alpha", (1, 1), False)


def _entries(network: str, embedding_size: int, naming: Naming):
    """(layer, megaface key or None, source name, source shape) for every parameter of ``network``."""
    for layer in layer_table(network, embedding_size):
        for field, suffix in naming.fields(layer.kind):
            key = f"{layer.key}.{field}" if field else None
            shape = layer.shape if field == "weight" or layer.kind in ("bn", "embedding") else layer.shape[:1]
            if layer.kind == "prelu":
                shape = shape + naming.prelu_trailing
            yield layer, key, naming.name(layer, suffix), tuple(shape)


def source_shapes(network: str, embedding_size: int, naming: Naming) -> dict[str, tuple[int, ...]]:
    """{source parameter name: shape} that ``network`` has in ``naming``'s framework."""
    return {name: shape for _, _, name, shape in _entries(network, embedding_size, naming)}


def embedding_size_of(arrays: Mapping[str, np.ndarray], network: str, naming: Naming, source: str) -> int:
    """D from the final BatchNorm's shift (`fc1_beta` / `fc1-beta`: every InsightFace network has it)."""
    beta = f"fc1{naming.sep}beta"
    if beta not in arrays:
        raise ValueError(f"{source}: no {beta!r}: not an InsightFace {naming.framework} {network} (found e.g. "
                         f"{sorted(arrays)[:5]})")
    return int(np.asarray(arrays[beta]).size)


def _check_names(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple], network: str, source: str,
                 naming: Naming) -> None:
    missing = [k for k in expected if k not in arrays]
    extra = [k for k in arrays if k not in expected]
    shape = [f"{k}: {list(arrays[k].shape)}, expected {list(v)}" for k, v in expected.items()
             if k in arrays and tuple(arrays[k].shape) != v]
    problems = [f"{len(items)} {what} (e.g. {items[:_SHOWN]})"
                for what, items in (("missing", missing), ("extra", extra), ("shape mismatch", shape)) if items]
    if problems:
        raise ValueError(f"{source}: {naming.framework} parameters do not fit {network}: {'; '.join(problems)}. "
                         f"Likely cause: another network (pass the right --network) or a damaged file")


def to_megaface(arrays: Mapping[str, np.ndarray], network: str, naming: Naming, source: str,
                fixed_gamma: frozenset[str] = frozenset()) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """(megaface state_dict, embedding size, notes) from InsightFace-named parameters.

    ``fixed_gamma``: BatchNorm layer names whose stored gamma the source ignores (MXNet fix_gamma=True);
    they get gamma 1. ``source`` names the file in errors.
    """
    embedding_size = embedding_size_of(arrays, network, naming, source)
    entries = list(_entries(network, embedding_size, naming))
    _check_names(arrays, {name: shape for _, _, name, shape in entries}, network, source, naming)
    state: dict[str, torch.Tensor] = {}
    folded: dict[str, np.ndarray] = {}
    for layer, key, name, _ in entries:
        value = np.asarray(arrays[name], dtype=np.float32)
        if key is None:
            folded[layer.name] = value
            continue
        if layer.kind == "prelu":
            value = value.reshape(-1)
        state[key] = torch.from_numpy(value.copy())
    notes = []
    layers = [entry[0] for entry in entries]
    for layer in dict.fromkeys(layers):  # BatchNorm layers: counters, and gamma 1 where it is fixed/absent
        if layer.kind in ("bn", "embedding"):
            state[f"{layer.key}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
            if layer.name in fixed_gamma or f"{layer.key}.weight" not in state:
                state[f"{layer.key}.weight"] = torch.ones(state[f"{layer.key}.bias"].shape)
    mean_key = f"{next(layer for layer in layers if layer.kind == 'embedding').key}.running_mean"
    for name, bias in folded.items():
        state[mean_key] = state[mean_key] - torch.from_numpy(bias)
        notes.append(f"folded {name}'s bias into the embedding BatchNorm's running mean (exact in eval mode)")
    fixed = sorted({layer.name for layer in layers} & set(fixed_gamma))
    if fixed:
        notes.append(f"{len(fixed)} BatchNorm(s) with fix_gamma=True (e.g. {fixed[:3]}): stored gamma ignored, 1 used")
    return state, embedding_size, notes


def from_megaface(state: Mapping[str, torch.Tensor], network: str, naming: Naming) -> dict[str, np.ndarray]:
    """InsightFace-named float32 arrays of a megaface backbone state_dict (zero bias where megaface has none)."""
    key = "fc.weight" if network.startswith("iresnet") else "features.layers.2.weight"
    if key not in state:
        raise ValueError(f"state_dict has no {key!r}: not a megaface {network} backbone (found e.g. {list(state)[:5]})")
    embedding_size = int(state[key].shape[0])
    out: dict[str, np.ndarray] = {}
    for _layer, key, name, shape in _entries(network, embedding_size, naming):
        if key is None:
            out[name] = np.zeros(shape, np.float32)
        else:
            out[name] = state[key].detach().to("cpu", torch.float32).numpy().reshape(shape).copy()
    return out
