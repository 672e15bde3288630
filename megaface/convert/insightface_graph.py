"""InsightFace's MXNet / OneFlow networks as a graph: layer names, topology and the megaface key of each layer.

One definition serves three uses: the MXNet `-symbol.json` that `export-mxnet` writes, the reference the
symbol of an imported model is checked against, and the layer table (megaface module path <-> InsightFace
layer name) that both the MXNet and the OneFlow converters map parameters with. The names are those of
InsightFace's `fresnet.py` (unit v3, output "E") and `fmobilefacenet.py` (output "GDC"), which the OneFlow
seed kept (`oneflow_face` symbols): see docs/insightface_mapping.md.

    graph = build_graph("iresnet50", embedding_size=512)
    graph.layers[0]   # Layer(key='conv1', name='conv0', kind='conv')
    graph.to_json()   # MXNet symbol JSON text
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from megaface.convert.mxnet_ops import OP_DEFAULTS
from megaface.models.iresnet import BN_EPS as IRESNET_BN_EPS
from megaface.models.iresnet import IRESNET_UNITS, STAGE_CHANNELS
from megaface.models.mobilefacenet import (
    CONV_BN_EPS,
    EMBEDDING_BN_EPS,
    MOBILEFACENET_SPECS,
)

# InsightFace's input normalisation inside the symbol: (x - 127.5) * 0.0078125 on RGB 0..255
# (megaface's normalize mode "oneflow").
INPUT_MEAN, INPUT_SCALE = 127.5, 0.0078125
INPUT_SIZE = 112
DROPOUT = 0.4  # fresnet "E": no weights, inactive at inference
_PARAMS = {"Convolution": ("weight",), "BatchNorm": ("gamma", "beta"), "LeakyReLU": ("gamma",),
           "FullyConnected": ("weight", "bias")}
_AUX = {"BatchNorm": ("moving_mean", "moving_var")}
_AUTO_NAMES = {"elemwise_add": "_plus", "_minus_scalar": "_minusscalar", "_mul_scalar": "_mulscalar",
               "Dropout": "dropout"}
# Layer kinds by op; "fc_nobias": megaface has no bias (folded into the next BatchNorm), "embedding": the
# final BatchNorm, whose scale megaface keeps fixed.
_KIND = {"Convolution": "conv", "BatchNorm": "bn", "LeakyReLU": "prelu", "FullyConnected": "fc"}


@dataclass(frozen=True)
class Layer:
    """key: megaface module path ('layer1.0.bn1'); name: InsightFace layer name ('stage1_unit1_bn1');
    kind: conv | bn | prelu | fc | fc_nobias | embedding; shape: of its weight ([C] for BN/PReLU);
    eps: a BatchNorm's eps, the same in megaface's network and InsightFace's (None for other kinds)."""

    key: str
    name: str
    kind: str
    shape: tuple[int, ...]
    eps: float | None = None


@dataclass
class Graph:
    """An MXNet symbol under construction; ``layers`` lists the parametrised layers in graph order."""

    nodes: list[dict[str, Any]] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    # (channels, spatial size) of each node's output: a shape inference just deep enough for the weights
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def _add(self, op: str, name: str, inputs: list[int], attrs: dict[str, str] | None = None) -> int:
        node: dict[str, Any] = {"op": op, "name": name, "inputs": [[i, 0, 0] for i in inputs]}
        if attrs:
            node["attrs"] = dict(attrs)
        self.nodes.append(node)
        return len(self.nodes) - 1

    def var(self, name: str) -> int:
        return self._add("null", name, [])

    def op(self, op: str, x: int | list[int], attrs: dict[str, Any], name: str | None = None,
           key: str | None = None, kind: str | None = None, shape: tuple[int, ...] = (),
           out: tuple[int, int] | None = None, eps: float | None = None) -> int:
        """Add ``op`` on input(s) ``x`` with its parameter variables; ``key`` records a megaface layer with
        weight ``shape``; ``out`` is the output (channels, size) when the op changes it."""
        if name is None:  # MXNet's automatic names: _plus0, _minusscalar0, dropout0, ...
            stem = _AUTO_NAMES[op]
            name = f"{stem}{self._counts.get(stem, 0)}"
            self._counts[stem] = self._counts.get(stem, 0) + 1
        inputs = list(x) if isinstance(x, list) else [x]
        params = [p for p in _PARAMS.get(op, ()) if not (p == "bias" and attrs.get("no_bias") == "True")]
        inputs += [self.var(f"{name}_{p}") for p in params + list(_AUX.get(op, ()))]
        if key is not None:
            self.layers.append(Layer(key, name, kind or _KIND[op], shape, eps))
        index = self._add(op, name, inputs, {k: str(v) for k, v in attrs.items()})
        self.sizes[index] = out or self.sizes[inputs[0]]
        return index

    def to_json(self, head: int) -> str:
        rows, row_ptr = 0, [0]
        for node in self.nodes:
            rows += 3 if node["op"] == "BatchNorm" else 1  # BatchNorm has 3 outputs (out, mean, var)
            row_ptr.append(rows)
        return json.dumps({
            "nodes": self.nodes,
            "arg_nodes": [i for i, n in enumerate(self.nodes) if n["op"] == "null"],
            "node_row_ptr": row_ptr,
            "heads": [[head, 0, 0]],
            "attrs": {"mxnet_version": ["int", 10600]},
        }, indent=2)

    # ---- InsightFace building blocks --------------------------------------------------------------------

    def conv(self, x: int, name: str, key: str, filters: int, kernel: int, stride: int, pad: int,
             groups: int = 1) -> int:
        attrs = {"kernel": f"({kernel}, {kernel})", "no_bias": "True", "num_filter": filters,
                 "num_group": groups, "pad": f"({pad}, {pad})", "stride": f"({stride}, {stride})"}
        channels, size = self.sizes[x]
        out = (filters, (size + 2 * pad - kernel) // stride + 1)
        return self.op("Convolution", x, attrs, name, key, shape=(filters, channels // groups, kernel, kernel),
                       out=out)

    def bn(self, x: int, name: str, key: str, eps: float, fix_gamma: bool = False, kind: str = "bn") -> int:
        attrs: dict[str, Any] = {"fix_gamma": fix_gamma, "momentum": 0.9}
        if eps != OP_DEFAULTS["BatchNorm"]["eps"]:  # fmobilefacenet leaves MXNet's default implicit
            attrs["eps"] = eps
        return self.op("BatchNorm", x, attrs, name, key, kind, shape=(self.sizes[x][0],), eps=eps)

    def prelu(self, x: int, name: str, key: str) -> int:
        return self.op("LeakyReLU", x, {"act_type": "prelu"}, name, key, shape=(self.sizes[x][0],))

    def fc(self, x: int, name: str, key: str, hidden: int, kind: str = "fc") -> int:
        channels, size = self.sizes[x]
        return self.op("FullyConnected", x, {"num_hidden": hidden}, name, key, kind,
                       shape=(hidden, channels * size * size), out=(hidden, 1))

    def normalise_input(self) -> int:
        x = self.var("data")
        self.sizes[x] = (3, INPUT_SIZE)
        x = self.op("_minus_scalar", x, {"scalar": INPUT_MEAN})
        return self.op("_mul_scalar", x, {"scalar": INPUT_SCALE})


def _iresnet(depth: int, embedding_size: int) -> tuple[Graph, int]:
    """fresnet: unit v3 (BN-conv-BN-PReLU-conv(stride)-BN + shortcut), output "E"."""
    g = Graph()
    x = g.conv(g.normalise_input(), "conv0", "conv1", 64, 3, 1, 1)
    x = g.prelu(g.bn(x, "bn0", "bn1", IRESNET_BN_EPS), "relu0", "prelu")
    for stage, (units, channels) in enumerate(zip(IRESNET_UNITS[depth], STAGE_CHANNELS, strict=False), start=1):
        for i in range(units):
            name, key = f"stage{stage}_unit{i + 1}", f"layer{stage}.{i}"
            stride = 2 if i == 0 else 1
            y = g.conv(g.bn(x, f"{name}_bn1", f"{key}.bn1", IRESNET_BN_EPS), f"{name}_conv1", f"{key}.conv1",
                       channels, 3, 1, 1)
            y = g.prelu(g.bn(y, f"{name}_bn2", f"{key}.bn2", IRESNET_BN_EPS), f"{name}_relu1", f"{key}.prelu")
            y = g.bn(g.conv(y, f"{name}_conv2", f"{key}.conv2", channels, 3, stride, 1), f"{name}_bn3",
                     f"{key}.bn3", IRESNET_BN_EPS)
            if i == 0:
                x = g.conv(x, f"{name}_conv1sc", f"{key}.downsample.0", channels, 1, stride, 0)
                x = g.bn(x, f"{name}_sc", f"{key}.downsample.1", IRESNET_BN_EPS)
            x = g.op("elemwise_add", [y, x], {})
    x = g.op("Dropout", g.bn(x, "bn1", "bn2", IRESNET_BN_EPS), {"p": DROPOUT})
    x = g.fc(x, "pre_fc1", "fc", embedding_size)
    return g, g.bn(x, "fc1", "features", IRESNET_BN_EPS, fix_gamma=True, kind="embedding")


def _mobilefacenet(network: str, embedding_size: int) -> tuple[Graph, int]:
    """fmobilefacenet with output "GDC" (InsightFace's y1 for blocks (1, 4, 6, 2))."""
    spec = MOBILEFACENET_SPECS[network]
    g = Graph()

    def unit(x: int, name: str, key: str, filters: int, kernel: int, stride: int, pad: int, groups: int = 1,
             act: bool = True) -> int:
        x = g.conv(x, f"{name}_conv2d", f"{key}.layers.0", filters, kernel, stride, pad, groups)
        x = g.bn(x, f"{name}_batchnorm", f"{key}.layers.1", CONV_BN_EPS)
        return g.prelu(x, f"{name}_relu", f"{key}.layers.2") if act else x

    def bottleneck(x: int, name: str, key: str, out: int, expand: int, stride: int) -> int:
        x = unit(x, f"{name}_conv_sep", f"{key}.layers.0", expand, 1, 1, 0)
        x = unit(x, f"{name}_conv_dw", f"{key}.layers.1", expand, 3, stride, 1, groups=expand)
        return unit(x, f"{name}_conv_proj", f"{key}.layers.2", out, 1, 1, 0, act=False)

    def stack(x: int, name: str, key: str, channels: int, blocks: int, expand: int) -> int:
        for j in range(blocks):
            x = g.op("elemwise_add", [bottleneck(x, f"{name}_block{j}", f"{key}.layers.{j}", channels, expand, 1),
                                      x], {})
        return x

    stem = spec.stem_channels
    x = unit(g.normalise_input(), "conv_1", "layers.0", stem, 3, 2, 1)
    if spec.stem_blocks == 1:
        x = unit(x, "conv_2_dw", "layers.1", stem, 3, 1, 1, groups=spec.stem_groups)
    else:
        x = stack(x, "res_2", "layers.1", stem, spec.stem_blocks, spec.stem_groups)
    for index, (out, down_expand, blocks, expand) in enumerate(spec.stages):
        level = index + 3  # InsightFace numbers the resolutions: dconv_23 goes from level 2 to 3
        x = bottleneck(x, f"dconv_{level - 1}{level}", f"layers.{2 + 2 * index}", out, down_expand, 2)
        x = stack(x, f"res_{level}", f"layers.{3 + 2 * index}", out, blocks, expand)
    x = unit(x, "conv_6sep", "conv_sep", spec.sep_channels, 1, 1, 0)
    x = unit(x, "conv_6dw7_7", "features.layers.0", spec.sep_channels, 7, 1, 0, groups=spec.sep_channels, act=False)
    x = g.fc(x, "pre_fc1", "features.layers.2", embedding_size, "fc_nobias")
    return g, g.bn(x, "fc1", "features.layers.3", EMBEDDING_BN_EPS, fix_gamma=True, kind="embedding")


# megaface networks that InsightFace's MXNet/OneFlow code defines (fmobilefacenet's default blocks = y1)
GRAPH_NETWORKS = tuple(f"iresnet{d}" for d in sorted(IRESNET_UNITS)) + ("mobilefacenet",)


def build_graph(network: str, embedding_size: int) -> tuple[Graph, int]:
    """(graph, head node index) of ``network`` in InsightFace's MXNet naming."""
    if network not in GRAPH_NETWORKS:
        raise ValueError(f"network {network!r} has no InsightFace MXNet/OneFlow counterpart; choose one of "
                         f"{list(GRAPH_NETWORKS)} (fmobilefacenet y1 = 'mobilefacenet', fresnet = 'iresnetNN')")
    if network.startswith("iresnet"):
        return _iresnet(int(network[len("iresnet"):]), embedding_size)
    return _mobilefacenet(network, embedding_size)


@functools.lru_cache(maxsize=8)
def layer_table(network: str, embedding_size: int) -> tuple[Layer, ...]:
    """The parametrised layers of ``network`` in graph order (cached; Layer is immutable)."""
    return tuple(build_graph(network, embedding_size)[0].layers)


def symbol_json(network: str, embedding_size: int) -> str:
    """The MXNet ``-symbol.json`` text of ``network`` (the embedding symbol InsightFace's model zoo ships)."""
    graph, head = build_graph(network, embedding_size)
    return graph.to_json(head)
