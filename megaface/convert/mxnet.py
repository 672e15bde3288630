"""InsightFace MXNet model-zoo files (`PREFIX-symbol.json` + `PREFIX-EPOCH.params`) <-> megaface backbones.

No MXNet needed: the .params list is read by `mxnet_params`, the symbol JSON with the standard library.
Every node's attributes are read through `mxnet_ops`: an attribute MXNet left out of the file is MXNet's
documented default (fresnet's shortcut convolutions store no pad, fmobilefacenet's BatchNorms no eps).
The symbol is checked against InsightFace's network definition (`insightface_graph`: every parametrised
layer present with the same op, kernel, stride, padding, dilation, groups, width, bias and activation) and
supplies what the params cannot: each BatchNorm's eps and fix_gamma (when True the stored gamma is ignored,
as MXNet does), and the input normalisation inside the graph,
(x - 127.5) * 0.0078125 on RGB 0..255, which is megaface's normalize mode "oneflow".

    megaface convert import-mxnet model-r100-ii/model --epoch 0 --network iresnet100 -o r100.safetensors
    megaface convert export-mxnet r100.safetensors -o exported/model     # exported/model-symbol.json, -0000.params
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megaface.convert.insightface_graph import (
    INPUT_MEAN,
    INPUT_SCALE,
    build_graph,
    layer_table,
)
from megaface.convert.insightface_layers import (
    MXNET,
    embedding_size_of,
    from_megaface,
    to_megaface,
)
from megaface.convert.mxnet_ops import node_attrs, raw_attrs
from megaface.convert.mxnet_params import read_params, write_params
from megaface.fileio import atomic_output_file

# attributes that fix a layer's arithmetic; each is compared after MXNet's defaults are filled in
_CHECKED_ATTRS = {"Convolution": ("kernel", "stride", "pad", "dilate", "num_group", "num_filter", "no_bias"),
                  "FullyConnected": ("num_hidden", "no_bias", "flatten"),
                  "BatchNorm": ("axis",),
                  "LeakyReLU": ("act_type",)}
_FC7 = ("fc7_weight", "fc7_bias")


def model_files(prefix: str | os.PathLike, epoch: int) -> tuple[Path, Path]:
    """(symbol JSON, params) paths of an MXNet checkpoint prefix, as mx.model.load_checkpoint names them."""
    return Path(f"{prefix}-symbol.json"), Path(f"{prefix}-{int(epoch):04d}.params")


@dataclass(frozen=True)
class SymbolFacts:
    """What an imported model needs from its symbol: per layer its op and every attribute (absent ones at
    MXNet's default, `mxnet_ops.node_attrs`), which of them the file stores, and the input normalisation."""

    ops: dict[str, tuple[str, dict[str, Any]]]
    stored: dict[str, frozenset[str]]
    normalize: str | None


def read_symbol(path: Path) -> SymbolFacts:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected the MXNet symbol PREFIX-symbol.json)")
    try:
        nodes = json.loads(path.read_text(encoding="utf-8"))["nodes"]
        named = [(n["name"], n["op"], raw_attrs(n)) for n in nodes if n.get("op") != "null"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not an MXNet symbol JSON ({type(err).__name__}: {str(err)[:120]})") from None
    ops = {name: (op, node_attrs(op, raw, f"{path}: node {name!r}")) for name, op, raw in named}
    stored = {name: frozenset(raw) for name, _, raw in named}
    scalars = [(op, attrs["scalar"]) for op, attrs in ops.values() if op in ("_minus_scalar", "_mul_scalar")]
    normalize = "oneflow" if scalars[:2] == [("_minus_scalar", INPUT_MEAN), ("_mul_scalar", INPUT_SCALE)] else None
    return SymbolFacts(ops, stored, normalize)


def _check_symbol(facts: SymbolFacts, network: str, embedding_size: int, path: Path) -> None:
    """Every parametrised layer of the reference graph must exist in the file with the same op and geometry."""
    graph, _ = build_graph(network, embedding_size)
    names = {layer.name for layer in graph.layers}
    for node in graph.nodes:
        if node["op"] == "null" or node["name"] not in names:
            continue
        found = facts.ops.get(node["name"])
        if found is None or found[0] != node["op"]:
            what = "is missing" if found is None else f"is a {found[0]}"
            raise ValueError(f"{path}: layer {node['name']!r} {what}, expected {node['op']} of an InsightFace "
                             f"{network}; pass the right --network")
        want = node_attrs(node["op"], raw_attrs(node), f"megaface's {network} {node['name']}")
        for attr in _CHECKED_ATTRS.get(node["op"], ()):
            if found[1][attr] != want[attr]:
                how = "" if attr in facts.stored[node["name"]] else " (absent: MXNet's default)"
                raise ValueError(f"{path}: layer {node['name']!r} has {attr}={found[1][attr]}{how}, megaface's "
                                 f"{network} has {want[attr]}; this symbol is another network variant and "
                                 "cannot be imported exactly")


def _bn_options(facts: SymbolFacts, network: str, embedding_size: int, path: Path) -> tuple[dict, frozenset]:
    """(build_options reproducing the file's BatchNorm eps, names of fix_gamma BatchNorms)."""
    eps, fixed, differ = {}, set(), []
    for layer in layer_table(network, embedding_size):
        if layer.kind not in ("bn", "embedding"):
            continue
        attrs = facts.ops[layer.name][1]
        eps[layer.name] = attrs["eps"]
        if attrs["fix_gamma"]:
            fixed.add(layer.name)
        if abs(eps[layer.name] - layer.eps) > 1e-12:
            differ.append(f"{layer.name} eps {eps[layer.name]:g} (megaface {layer.eps:g})")
    if not differ:
        return {}, frozenset(fixed)
    if len(set(eps.values())) == 1:
        return {"bn_eps": next(iter(eps.values()))}, frozenset(fixed)
    raise ValueError(f"{path}: BatchNorm eps values {sorted(set(eps.values()))} differ from megaface's {network} "
                     f"layer by layer ({differ[:4]}); only a single eps override is supported")


def _split_params(arrays: dict[str, np.ndarray], path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(backbone arrays without 'arg:'/'aux:' prefixes, FC7 arrays)."""
    plain: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        kind, _, bare = name.partition(":")
        if kind not in ("arg", "aux") or not bare:
            raise ValueError(f"{path}: array name {name!r} lacks the 'arg:'/'aux:' prefix of a model checkpoint "
                             "(mx.model.save_checkpoint writes both)")
        plain[bare] = value
    fc7 = {k: plain.pop(k) for k in _FC7 if k in plain}
    return plain, fc7


def import_mxnet(prefix: str | os.PathLike, output: str | os.PathLike, network: str, epoch: int = 0,
                 fc7_output: str | os.PathLike | None = None, num_classes: int | None = None) -> str:
    """Convert an InsightFace MXNet model into a megaface backbone file; returns the report text."""
    from megaface.checkpoint import save_backbone_file

    symbol_path, params_path = model_files(prefix, epoch)
    layer_table(network, 1)  # unknown network: fail before reading anything
    facts = read_symbol(symbol_path)
    backbone, fc7 = _split_params(read_params(params_path), params_path)
    embedding_size = embedding_size_of(backbone, network, MXNET, str(params_path))
    _check_symbol(facts, network, embedding_size, symbol_path)
    build_options, fixed = _bn_options(facts, network, embedding_size, symbol_path)
    state, _, notes = to_megaface(backbone, network, MXNET, str(params_path), fixed)
    if build_options:
        notes.append(f"BatchNorm eps {build_options['bn_eps']:g} recorded as build option (megaface default differs)")
    if facts.normalize is None:
        notes.append("the symbol does not normalise its input with (x - 127.5) * 0.0078125: check how the model "
                     "expects pixels before evaluating (meta normalize left unset)")
    meta = {"network": network, "embedding_size": embedding_size, "source": "mxnet",
            "source_file": str(params_path), "build_options": build_options}
    if facts.normalize:
        meta["normalize"] = facts.normalize
    out = save_backbone_file(output, state, meta)
    summary = f"{network} (embedding_size={embedding_size}): {len(backbone)} MXNet arrays matched"
    lines = [f"wrote megaface backbone {out}", summary] + [f"  - {note}" for note in notes]
    if fc7:
        from megaface.convert.fc7_import import write_fc7_shard_set

        target = fc7_output or Path(output).with_name(f"{Path(output).stem}_fc7")
        if "fc7_bias" in fc7:
            lines.append("  - fc7_bias ignored: megaface's FC7 has no bias")
        lines.append(write_fc7_shard_set(target, fc7["fc7_weight"], None, num_classes,
                                         {"network": network, "source": str(params_path)}))
    return "\n".join(lines)


def _export_symbol(model: Any) -> str:
    """The reference symbol with each BatchNorm's eps and fix_gamma as this model computes them (an
    arcface_torch import runs with eps 1e-5 and may have a trained embedding scale)."""
    import torch

    graph, head = build_graph(model.network_name, model.embedding_size)
    modules = dict(model.named_modules())
    nodes = {node["name"]: node for node in graph.nodes}
    for layer in graph.layers:
        if layer.kind in ("bn", "embedding"):
            module = modules[layer.key]
            attrs = nodes[layer.name].setdefault("attrs", {})
            attrs["eps"] = repr(float(module.eps))
            attrs["fix_gamma"] = str(bool(torch.equal(module.weight, torch.ones_like(module.weight)))
                                     and layer.kind == "embedding")
    return graph.to_json(head)


def export_mxnet(src: str | os.PathLike, prefix: str | os.PathLike, network: str | None = None,
                 epoch: int = 0, verify: bool = True) -> str:
    """Write a megaface checkpoint/backbone as InsightFace MXNet files (symbol JSON + params)."""
    from megaface.checkpoint import load_backbone

    model, _ = load_backbone(src, network=network, verify=verify)
    arrays = from_megaface(model.state_dict(), model.network_name, MXNET)
    aux = ("_moving_mean", "_moving_var")
    named = {f"{'aux' if name.endswith(aux) else 'arg'}:{name}": value for name, value in arrays.items()}
    symbol_path, params_path = model_files(prefix, epoch)
    text = _export_symbol(model)
    with atomic_output_file(symbol_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    write_params(params_path, named)
    return (f"wrote MXNet {model.network_name} {symbol_path} + {params_path} ({len(named)} arrays; input "
            "RGB 0..255, normalised inside the symbol)")
