"""InsightFace arcface_torch interop: iresnet/mbf/vit state_dicts <-> megaface backbones.

megaface's IResNet, MobileFaceNet and ViT module trees mirror arcface_torch's, so the mapping is key for key
(docs/insightface_mapping.md has the table). What this module adds is the checking: the network is detected
from key names and tensor shapes, every key must be matched (no missing, no extra, no shape mismatch) or a
ValueError names the offending keys and the likely cause, and the differences that a state_dict does not
show (BatchNorm eps, the final BatchNorm's scale) are reported.

    sd, report = import_insightface(torch.load("backbone.pth"))   # network auto-detected
    model = build_model(report.network, report.embedding_size, **report.build_options)
    model.load_state_dict(sd)
    torch.save(export_insightface(model.state_dict(), model.network_name), "backbone.pth")
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from megaface.models import build_model
from megaface.models.iresnet import IRESNET_UNITS
from megaface.models.mobilefacenet import MOBILEFACENET_SPECS
from megaface.models.vit import VIT_SPECS

# arcface_torch builds every BatchNorm with eps 1e-5; megaface uses the seed's 2e-5 / 1e-3.
INSIGHTFACE_BN_EPS = 1e-5
# Networks that arcface_torch can express (its MobileFaceNet fixes the expansion widths and the GDC width).
INSIGHTFACE_NETWORKS = tuple(f"iresnet{d}" for d in sorted(IRESNET_UNITS)) + (
    "mobilefacenet", "mobilefacenet_wide", "mobilefacenet_large") + tuple(VIT_SPECS)
# The key holding [D, ...] of the embedding layer, per family (gives D).
_EMBEDDING_KEY = {"iresnet": "fc.weight", "mobilefacenet": "features.layers.2.weight", "vit": "feature.2.weight"}


def _embedding_key(network: str) -> str:
    return _EMBEDDING_KEY[next(prefix for prefix in _EMBEDDING_KEY if network.startswith(prefix))]
# arcface_torch training checkpoints (checkpoint_gpu_<rank>.pt) keep the backbone under this key.
_WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model")
_SHOWN = 8  # keys listed per category in an error message


@dataclass
class InteropReport:
    """What a conversion found: the network, how every key was matched, and caveats."""

    network: str
    embedding_size: int
    matched: int
    notes: list[str] = field(default_factory=list)
    build_options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.network} (embedding_size={self.embedding_size}): {self.matched} keys matched"]
        return "\n".join(lines + [f"  - {note}" for note in self.notes])


@functools.lru_cache(maxsize=32)
def _expected_shapes(network: str, embedding_size: int) -> dict[str, tuple[int, ...]]:
    # The meta device gives names and shapes without allocating (IResNet-200 alone is ~0.5 GB).
    with torch.device("meta"):
        model = build_model(network, embedding_size=embedding_size)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _unwrap(state: Mapping[str, Any], notes: list[str]) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state_dict (a mapping of tensors), got {type(state).__name__} {state!r:.80}; "
                         "for files use import_insightface_file(src, output) / export_insightface_file")
    for key in _WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            notes.append(f"took the backbone from the checkpoint entry {key!r}")
            state = state[key]
            break
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"expected a state_dict of tensors, but entries {not_tensors[:_SHOWN]} are not tensors; "
                         "pass the backbone state_dict (torch.load of arcface_torch's backbone.pth)")
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        notes.append("stripped the DistributedDataParallel prefix 'module.'")
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _iresnet_units(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    units = []
    for stage in range(1, 5):
        found = [int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))]
        units.append(max(found) + 1 if found else 0)
    return tuple(units)


def detect_network(state: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """(network, embedding_size) of an arcface_torch-layout (or megaface) backbone state_dict."""
    if "fc.weight" in state and "layer1.0.conv1.weight" in state:
        embedding_size = int(state["fc.weight"].shape[0])
        units = _iresnet_units(state)
        for depth, expected in IRESNET_UNITS.items():
            if tuple(expected) == units:
                return f"iresnet{depth}", embedding_size
        raise ValueError(f"IResNet-like state_dict with {units} units per stage matches no known depth "
                         f"({ {f'iresnet{d}': u for d, u in IRESNET_UNITS.items()} })")
    if "conv_sep.layers.0.weight" in state and "features.layers.2.weight" in state:
        embedding_size = int(state["features.layers.2.weight"].shape[0])
        given = {k: tuple(v.shape) for k, v in state.items()}
        ranked = sorted(MOBILEFACENET_SPECS, key=lambda n: _mismatch_count(_expected_shapes(n, embedding_size), given))
        best = ranked[0]
        if _mismatch_count(_expected_shapes(best, embedding_size), given) == 0:
            return best, embedding_size
        raise ValueError("MobileFaceNet-like state_dict matches none of "
                         f"{list(MOBILEFACENET_SPECS)}; closest is {best!r}: "
                         f"{_describe(_diff(_expected_shapes(best, embedding_size), given))}")
    if "patch_embed.proj.weight" in state and "feature.2.weight" in state:
        return _detect_vit(state)
    raise ValueError("not an arcface_torch iresnet, mbf or vit backbone: expected keys 'conv1.weight'/'fc.weight'/"
                     "'layer1.0.conv1.weight' (iresnet), 'layers.0.layers.0.weight'/'conv_sep.layers.0.weight'"
                     f" (mbf) or 'patch_embed.proj.weight'/'feature.2.weight' (vit); found e.g. {list(state)[:5]}")


def _detect_vit(state: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """A ViT is named by (embed dim, depth); the head count (8 in every size) is not in the weights."""
    dim = int(state["patch_embed.proj.weight"].shape[0])
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    for name, spec in VIT_SPECS.items():
        if (spec.embed_dim, spec.depth) == (dim, depth):
            return name, int(state["feature.2.weight"].shape[0])
    known = {name: (spec.embed_dim, spec.depth) for name, spec in VIT_SPECS.items()}
    raise ValueError(f"ViT-like state_dict with embed_dim {dim} and {depth} blocks matches none of {known} "
                     "(name: (embed_dim, depth))")


def _diff(expected: Mapping[str, tuple], given: Mapping[str, tuple]) -> dict[str, list[str]]:
    return {
        "missing": [k for k in expected if k not in given],
        "unexpected": [k for k in given if k not in expected],
        "shape": [f"{k}: expected {list(expected[k])}, got {list(given[k])}"
                  for k in expected if k in given and tuple(given[k]) != tuple(expected[k])],
    }


def _mismatch_count(expected: Mapping[str, tuple], given: Mapping[str, tuple]) -> int:
    return sum(len(v) for v in _diff(expected, given).values())


def _describe(diff: Mapping[str, list[str]]) -> str:
    parts = [f"{len(items)} {kind} (e.g. {items[:_SHOWN]})" for kind, items in diff.items() if items]
    return "; ".join(parts) or "no differences"


def _resolve_network(state: Mapping[str, torch.Tensor], network: str | None) -> tuple[str, int]:
    if network is None:
        return detect_network(state)
    detected: str | None
    embedding_size: int | None
    try:
        detected, embedding_size = detect_network(state)
    except ValueError:
        detected, embedding_size = None, None
    if network not in INSIGHTFACE_NETWORKS:
        raise ValueError(f"{network!r} has no arcface_torch counterpart; choose one of {list(INSIGHTFACE_NETWORKS)}")
    if embedding_size is None:
        key = _embedding_key(network)
        embedding_size = int(state[key].shape[0]) if key in state else 512
    if detected is not None and detected != network:
        raise ValueError(f"the state_dict holds a {detected} (embedding_size={embedding_size}), not {network}: "
                         f"pass network={detected!r} or None to auto-detect")
    return network, embedding_size


def _check_exact(state: Mapping[str, torch.Tensor], network: str, embedding_size: int) -> None:
    diff = _diff(_expected_shapes(network, embedding_size), {k: tuple(v.shape) for k, v in state.items()})
    if any(diff.values()):
        raise ValueError(f"state_dict does not fit {network} (embedding_size={embedding_size}): "
                         f"{_describe(diff)}. Likely cause: another network or a truncated/edited state_dict")


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    # Fresh fp32 storage on CPU: the result never aliases the caller's tensors; integer counters stay int64.
    if tensor.is_floating_point():
        return tensor.detach().to("cpu", torch.float32, copy=True)
    return tensor.detach().to("cpu", copy=True)


def import_insightface(state_dict: Mapping[str, Any], network: str | None = None
                       ) -> tuple[dict[str, torch.Tensor], InteropReport]:
    """arcface_torch iresnet/mbf state_dict -> (megaface backbone state_dict, report).

    Accepts a plain backbone state_dict, one saved from DDP ('module.' prefix) or an arcface_torch training
    checkpoint holding 'state_dict_backbone'. ``network`` None auto-detects it from keys and shapes.
    Raises ValueError naming missing/unexpected keys and shape mismatches, and the likely cause.
    """
    notes: list[str] = []
    state = _unwrap(state_dict, notes)
    network, embedding_size = _resolve_network(state, network)
    _check_exact(state, network, embedding_size)
    converted = {key: _copy(value) for key, value in state.items()}
    halves = sorted({str(v.dtype) for v in state.values() if v.is_floating_point() and v.dtype != torch.float32})
    if halves:
        notes.append(f"converted {halves} tensors to float32")
    if network in VIT_SPECS:
        # Same eps (LayerNorm 1e-5, feature BatchNorms 2e-5) and a trained final BN scale on both sides.
        notes.append("arcface_torch's vit_* variants (e.g. vit_t vs vit_t_dp005_mask0) share these weights and "
                     "differ only in drop path / mask ratio; set model.drop_path_rate / model.mask_ratio to "
                     "continue training one of them exactly")
        return converted, InteropReport(network, embedding_size, len(converted), notes, {})
    gamma_key = "features.weight" if network.startswith("iresnet") else "features.layers.3.weight"
    if not torch.equal(converted[gamma_key], torch.ones_like(converted[gamma_key])):
        notes.append(f"{gamma_key} (final BatchNorm scale) is not all ones: kept as a fixed scale, "
                     "megaface does not train it")
    notes.append(f"arcface_torch uses BatchNorm eps {INSIGHTFACE_BN_EPS}; build the model with "
                 f"bn_eps={INSIGHTFACE_BN_EPS} to reproduce its outputs exactly (megaface's default eps "
                 "differs slightly, harmless for fine-tuning)")
    report = InteropReport(network, embedding_size, len(converted), notes, {"bn_eps": INSIGHTFACE_BN_EPS})
    return converted, report


def export_insightface(megaface_state_dict: Mapping[str, torch.Tensor], network: str) -> dict[str, torch.Tensor]:
    """megaface backbone state_dict of ``network`` -> arcface_torch state_dict (same keys, fp32 copies).

    Load it into arcface_torch's ``get_model('r100', num_features=D)`` (iresnet), its MobileFaceNet with
    the scale/blocks given in docs/insightface_mapping.md, or ``get_model('vit_t', num_features=D)`` etc.
    """
    if network not in INSIGHTFACE_NETWORKS:
        raise ValueError(f"{network!r} has no arcface_torch counterpart; choose one of {list(INSIGHTFACE_NETWORKS)}")
    if not isinstance(megaface_state_dict, Mapping):
        raise ValueError(f"expected a megaface backbone state_dict, got {type(megaface_state_dict).__name__}; "
                         "for checkpoints use export_insightface_file(src, output)")
    state = dict(megaface_state_dict)
    key = _embedding_key(network)
    if key not in state:
        raise ValueError(f"state_dict has no {key!r}: it is not a megaface {network} backbone "
                         f"(found e.g. {list(state)[:5]})")
    embedding_size = int(state[key].shape[0])
    _check_exact(state, network, embedding_size)
    return {k: _copy(v) for k, v in state.items()}


def _load_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise a zoo of pickle/zip errors
        raise ValueError(f"{path} is not a readable torch state_dict file ({type(err).__name__}: "
                         f"{str(err)[:200]}); is it truncated?") from None


def import_insightface_file(src: str | os.PathLike, output: str | os.PathLike, network: str | None = None,
                            embedding_size: int | None = None) -> str:
    """Read an arcface_torch .pth, convert it and write a megaface backbone file; returns the report text."""
    from megaface.checkpoint import save_backbone_file

    state, report = import_insightface(_load_file(Path(src)), network)
    if embedding_size is not None and embedding_size != report.embedding_size:
        raise ValueError(f"{src} holds a {report.embedding_size}-d {report.network}, not {embedding_size}-d")
    meta = {"network": report.network, "embedding_size": report.embedding_size, "source": "arcface_torch",
            "source_file": str(src), "build_options": dict(report.build_options)}
    out = save_backbone_file(output, state, meta)
    return f"wrote megaface backbone {out}\n{report}"


def export_insightface_file(src: str | os.PathLike, output: str | os.PathLike, network: str | None = None,
                            verify: bool = True) -> str:
    """Read a megaface checkpoint/backbone (``load_backbone``) and write an arcface_torch .pth state_dict."""
    from megaface.checkpoint import load_backbone
    from megaface.fileio import atomic_torch_save

    model, _meta = load_backbone(src, network=network, verify=verify)
    state = export_insightface(model.state_dict(), model.network_name)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, Path(output))
    return f"wrote arcface_torch {model.network_name} state_dict {output} ({len(state)} tensors)"
