"""ONNX -> megaface backbone, for graphs exported by InsightFace arcface_torch's torch2onnx.py (or any eval-mode
TorchScript export of the same IResNet / MobileFaceNet networks).

    state_dict, report = import_onnx("model.onnx", "iresnet50")

How the graph is read: megaface's `network` runs one forward pass with hooks on its layers, which gives the
order in which its Conv2d, BatchNorm, PReLU and Linear layers execute; the ONNX nodes (topologically sorted, as
the exporter writes them in execution order) must follow the same order, layer for layer:

    ONNX node                          megaface layer(s)
    Conv (with bias B)                 Conv2d + the BatchNorm2d fed by it, folded by the exporter in eval mode:
                                       the Conv2d takes the weight, the BatchNorm2d becomes an identity carrying
                                       the bias (gamma 1, beta B, mean 0, var 1 - eps: sqrt(var + eps) == 1)
    Conv (no bias) + BatchNormalization  the same pair, not folded: both copied as they are
    BatchNormalization                 a BatchNorm not fed by a Conv2d (IResNet's bn1/bn2/features, the
                                       MobileFaceNet embedding BatchNorm1d): copied, its epsilon must match
    PRelu                              PReLU (the slope [C, 1, 1] reshaped to [C])
    Gemm (alpha = beta = 1) / MatMul   Linear (MatMul: no bias; its [in, out] matrix is transposed)
    Add / Flatten / Reshape / Constant / Identity   residual adds and reshapes: no weights (the number of adds
                                       must equal megaface's)

Anything else, or a layer whose kernel, stride, padding, groups or weight shape differs, refuses the graph with
one line naming the first ONNX node that does not match. `import_onnx` then checks the result numerically with
onnxruntime when it is installed (cosine >= 0.9999 per embedding on random inputs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from megaface.convert.insightface import INSIGHTFACE_BN_EPS, INSIGHTFACE_NETWORKS
from megaface.models import build_model
from megaface.models.vit import VIT_SPECS

ONNX_NETWORKS = tuple(n for n in INSIGHTFACE_NETWORKS if n not in VIT_SPECS)
MIN_COSINE = 0.9999
_SHAPE_OPS = ("Flatten", "Reshape", "Constant", "Identity")
_LAYER_OPS = ("Conv", "BatchNormalization", "PRelu", "Gemm", "MatMul")


@dataclass
class Layer:
    """One megaface layer in execution order; `bn` is the BatchNorm2d fed directly by this Conv2d."""

    name: str
    module: nn.Module
    bn_name: str | None = None
    bn: Any = None  # nn.BatchNorm2d


@dataclass
class OnnxReport:
    network: str
    embedding_size: int
    layers: int
    folded: int
    bn_eps: float = INSIGHTFACE_BN_EPS
    notes: list[str] = field(default_factory=list)
    min_cosine: float | None = None

    def __str__(self) -> str:
        check = (f"onnxruntime vs megaface: min cosine {self.min_cosine:.6f}" if self.min_cosine is not None
                 else "not checked numerically (onnxruntime is not installed)")
        lines = [f"{self.network} (embedding_size={self.embedding_size}): {self.layers} ONNX layers matched, "
                 f"{self.folded} Conv+BatchNorm folded pairs imported as identity BatchNorms; {check}"]
        return "\n".join(lines + [f"  - {note}" for note in self.notes])


def _onnx() -> Any:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ValueError("import-onnx needs the onnx package: pip install 'megaface[onnx]'") from exc
    return onnx, numpy_helper


def _execution_order(model: nn.Module, size: int = 112) -> tuple[list[Layer], int]:
    """megaface's weighted layers in the order they run (Conv2d fused with the BatchNorm2d it feeds) and the
    number of residual additions."""
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    names = {module: name for name, module in model.named_modules()}
    kinds = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.Linear)

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        calls.append((names[module], module, inputs[0], output))
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    adds = _AddCounter()
    try:
        with torch.no_grad(), adds:
            model(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    layers: list[Layer] = []
    previous_output = None
    for name, module, inputs, output in calls:
        last = layers[-1] if layers else None
        if (isinstance(module, nn.BatchNorm2d) and last is not None and isinstance(last.module, nn.Conv2d)
                and last.bn is None and inputs is previous_output):
            last.bn_name, last.bn = name, module
        else:
            layers.append(Layer(name, module))
        previous_output = output
    return layers, adds.count


class _AddCounter(torch.overrides.TorchFunctionMode):
    """Counts tensor + tensor additions (the residual adds) during a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in ("add", "__add__", "add_", "__iadd__", "__radd__") and len(args) >= 2 \
                and all(torch.is_tensor(a) for a in args[:2]):
            self.count += 1
        return func(*args, **(kwargs or {}))


class _Graph:
    """The ONNX graph's nodes, initializers (as numpy) and which node produced each value."""

    def __init__(self, path: Path) -> None:
        onnx, numpy_helper = _onnx()
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as err:  # noqa: BLE001 - protobuf raises many types for a damaged file
            raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__}: {str(err)[:200]})") from None
        self.path = path
        self.graph = model.graph
        self.init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:  # Constant nodes holding weights (some exporters write them so)
            if node.op_type == "Constant" and node.attribute:
                value = onnx.helper.get_attribute_value(node.attribute[0])
                if hasattr(value, "dims"):
                    self.init[node.output[0]] = numpy_helper.to_array(value)
        self._attr = onnx.helper.get_attribute_value

    def attrs(self, node: Any) -> dict[str, Any]:
        return {a.name: self._attr(a) for a in node.attribute}

    def weight(self, node: Any, index: int) -> np.ndarray | None:
        return self.init.get(node.input[index]) if len(node.input) > index and node.input[index] else None

    def label(self, node: Any) -> str:
        return f"{self.path.name}: node {node.name or node.output[0]!r} ({node.op_type})"


def _mismatch(graph: _Graph, node: Any, network: str, layer: Layer | None, what: str) -> ValueError:
    where = f"megaface's {network} layer {layer.name!r} ({type(layer.module).__name__})" if layer else \
        f"megaface's {network} (no layer left)"
    return ValueError(f"{graph.label(node)} does not match {where}: {what}; the graph is not this network "
                      f"(choose the --network it was exported from: one of {list(ONNX_NETWORKS)})")


def _check_conv(graph: _Graph, node: Any, layer: Layer, network: str) -> np.ndarray:
    conv: nn.Conv2d = layer.module  # type: ignore[assignment]
    weight = graph.weight(node, 1)
    a = graph.attrs(node)
    found = {"weight": None if weight is None else tuple(weight.shape),
             "stride": tuple(a.get("strides", (1, 1))), "dilation": tuple(a.get("dilations", (1, 1))),
             "groups": int(a.get("group", 1)), "padding": tuple(a.get("pads", (0, 0, 0, 0)))}
    expected = {"weight": tuple(conv.weight.shape), "stride": conv.stride, "dilation": conv.dilation,
                "groups": conv.groups, "padding": tuple(conv.padding) * 2}
    for key in expected:
        if _as_tuple(found[key]) != _as_tuple(expected[key]):
            raise _mismatch(graph, node, network, layer, f"{key} {found[key]} vs {expected[key]}")
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise _mismatch(graph, node, network, layer, f"auto_pad {a['auto_pad']!r} (expected explicit pads)")
    if weight is None:  # unreachable: a missing weight fails the shape comparison; for the type checker
        raise _mismatch(graph, node, network, layer, "no weight initializer")
    return weight


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _bn_state(graph: _Graph, node: Any, layer_name: str, module: Any, network: str) -> dict[str, np.ndarray]:
    arrays = [graph.weight(node, i) for i in range(1, 5)]
    n = module.num_features
    if any(a is None or a.shape != (n,) for a in arrays):
        raise _mismatch(graph, node, network, Layer(layer_name, module),
                        f"scale/bias/mean/var shapes {[None if a is None else a.shape for a in arrays]}, expected "
                        f"[{n}] each")
    eps = float(graph.attrs(node).get("epsilon", 1e-5))
    if not np.isclose(eps, module.eps, rtol=1e-3):
        raise _mismatch(graph, node, network, Layer(layer_name, module), f"epsilon {eps:g} vs {module.eps:g}")
    checked = [a for a in arrays if a is not None]  # all present: checked above
    return dict(zip(("weight", "bias", "running_mean", "running_var"), checked, strict=True))


def _identity_bn(bias: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """A BatchNorm whose eval output is x + bias: gamma 1, mean 0, var 1 - eps."""
    n = bias.shape[0]
    return {"weight": np.ones(n, np.float32), "bias": bias, "running_mean": np.zeros(n, np.float32),
            "running_var": np.full(n, 1.0 - eps, np.float32)}


def match_graph(graph: _Graph, network: str, model: nn.Module) -> tuple[dict[str, np.ndarray], int, int]:
    """(megaface state entries by key, matched layers, folded pairs); raises naming the first foreign node."""
    layers, expected_adds = _execution_order(model)
    state: dict[str, np.ndarray] = {}
    nodes = list(graph.graph.node)
    i, k, folded, adds = 0, 0, 0, 0
    while i < len(nodes):
        node = nodes[i]
        i += 1
        if node.op_type in _SHAPE_OPS:
            continue
        if node.op_type == "Add" and all(x not in graph.init for x in node.input):
            adds += 1
            continue
        layer = layers[k] if k < len(layers) else None
        if node.op_type not in _LAYER_OPS or layer is None:
            raise _mismatch(graph, node, network, layer, f"op {node.op_type} has no counterpart at this point")
        module, k = layer.module, k + 1
        if node.op_type == "Conv" and isinstance(module, nn.Conv2d):
            state[f"{layer.name}.weight"] = _check_conv(graph, node, layer, network)
            bias = graph.weight(node, 2)
            if layer.bn is None:
                if bias is not None:
                    raise _mismatch(graph, node, network, layer, "the Conv has a bias, megaface's conv has none")
                continue
            after = nodes[i] if i < len(nodes) else None
            if bias is None and after is not None and after.op_type == "BatchNormalization" \
                    and after.input[0] == node.output[0]:
                bn = _bn_state(graph, after, str(layer.bn_name), layer.bn, network)
                i += 1
            elif bias is not None:
                bn, folded = _identity_bn(bias, layer.bn.eps), folded + 1
            else:
                raise _mismatch(graph, node, network, layer, f"neither a folded bias nor the BatchNorm "
                                f"{layer.bn_name!r} after the Conv")
            state.update({f"{layer.bn_name}.{key}": value for key, value in bn.items()})
        elif node.op_type == "BatchNormalization" and isinstance(module, nn.modules.batchnorm._BatchNorm):
            state.update({f"{layer.name}.{key}": value
                          for key, value in _bn_state(graph, node, layer.name, module, network).items()})
        elif node.op_type == "PRelu" and isinstance(module, nn.PReLU):
            slope = graph.weight(node, 1)
            if slope is None or slope.size != module.weight.numel():
                raise _mismatch(graph, node, network, layer, f"slope of {None if slope is None else slope.size} "
                                f"values, expected {module.weight.numel()}")
            state[f"{layer.name}.weight"] = slope.reshape(tuple(module.weight.shape))
        elif node.op_type in ("Gemm", "MatMul") and isinstance(module, nn.Linear):
            state.update(_linear(graph, node, layer, network))
        else:
            raise _mismatch(graph, node, network, layer, f"op {node.op_type} where megaface has "
                                                         f"{type(module).__name__}")
    if k < len(layers):
        raise ValueError(f"{graph.path.name}: the graph ends before megaface's {network} layer {layers[k].name!r} "
                         f"({type(layers[k].module).__name__}); it is a smaller network")
    if adds != expected_adds:
        raise ValueError(f"{graph.path.name}: {adds} residual Add nodes, megaface's {network} has {expected_adds}; "
                         "the graph is another network variant")
    return state, k, folded


def _linear(graph: _Graph, node: Any, layer: Layer, network: str) -> dict[str, np.ndarray]:
    linear: nn.Linear = layer.module  # type: ignore[assignment]
    matrix, a = graph.weight(node, 1), graph.attrs(node)
    if matrix is None or matrix.ndim != 2:
        raise _mismatch(graph, node, network, layer, "no 2-d weight initializer")
    if node.op_type == "MatMul" or not a.get("transB", 0):
        matrix = matrix.T
    if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
        raise _mismatch(graph, node, network, layer, f"Gemm attributes {a} (expected transA 0, alpha = beta = 1)")
    if tuple(matrix.shape) != tuple(linear.weight.shape):
        raise _mismatch(graph, node, network, layer, f"weight {tuple(matrix.shape)} vs {tuple(linear.weight.shape)}")
    out = {f"{layer.name}.weight": np.ascontiguousarray(matrix)}
    bias = graph.weight(node, 2) if node.op_type == "Gemm" else None
    if (bias is None) != (linear.bias is None):
        raise _mismatch(graph, node, network, layer, "bias present on one side only")
    if bias is not None:
        out[f"{layer.name}.bias"] = np.broadcast_to(bias, (matrix.shape[0],)).copy()
    return out


def _embedding_size(graph: _Graph) -> int:
    """Output width of the last Gemm/MatMul (the embedding layer)."""
    for node in reversed(graph.graph.node):
        weight = graph.weight(node, 1) if node.op_type in ("Gemm", "MatMul") else None
        if weight is not None and weight.ndim == 2:
            transposed = node.op_type == "Gemm" and graph.attrs(node).get("transB", 0)
            return int(weight.shape[0] if transposed else weight.shape[1])
    raise ValueError(f"{graph.path}: no Gemm/MatMul node with a weight: not a face embedding network")


def _bn_eps(graph: _Graph) -> float:
    """The first BatchNormalization's epsilon (a float32 attribute: 1e-5 reads 9.99999975e-06, rounded back)."""
    eps = [float(graph.attrs(n).get("epsilon", 1e-5)) for n in graph.graph.node if n.op_type == "BatchNormalization"]
    return float(f"{eps[0]:.6g}") if eps else INSIGHTFACE_BN_EPS


def onnxruntime_cosine(path: Path, model: nn.Module, batch: int = 2, seed: int = 0) -> float | None:
    """Min cosine over a random batch between onnxruntime's output and `model`'s (eval); None without ort."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    images = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    # one image per run: torch2onnx traces at batch 1, and MobileFaceNet's flatten becomes Reshape([1, -1])
    theirs = torch.cat([torch.from_numpy(session.run(None, {name: image[None].numpy()})[0]) for image in images])
    with torch.no_grad():
        ours = model.eval()(images)
    # float64: random-weight IResNets reach 1e28 per element, whose squares overflow float32
    return float(torch.nn.functional.cosine_similarity(theirs.double(), ours.double()).min())


def import_onnx(path: str | os.PathLike, network: str, verify: bool = True) -> tuple[dict[str, torch.Tensor],
                                                                                     OnnxReport]:
    """(megaface state_dict of `network` built with the graph's BatchNorm eps, report)."""
    if network not in ONNX_NETWORKS:
        raise ValueError(f"--network {network!r}: ONNX import supports {list(ONNX_NETWORKS)}")
    graph = _Graph(Path(path))
    embedding_size, eps = _embedding_size(graph), _bn_eps(graph)
    model = build_model(network, embedding_size=embedding_size, bn_eps=eps).eval()
    arrays, matched, folded = match_graph(graph, network, model)
    state = model.state_dict()
    for key, value in arrays.items():
        state[key] = torch.from_numpy(np.array(value, np.float32)).reshape(state[key].shape)
    model.load_state_dict(state)
    report = OnnxReport(network, embedding_size, matched, folded, eps)
    if verify:
        report.min_cosine = onnxruntime_cosine(Path(path), model)
        if report.min_cosine is not None and report.min_cosine < MIN_COSINE:
            raise ValueError(f"{path}: imported as {network}, but megaface's embeddings differ from onnxruntime's "
                             f"(min cosine {report.min_cosine:.6f} < {MIN_COSINE}); the graph's wiring differs "
                             "from megaface's network")
    if eps != INSIGHTFACE_BN_EPS:
        report.notes.append(f"BatchNorm eps {eps:g} recorded as a build option")
    report.notes.append(f"train from it with model.bn_eps={eps:g} to keep its BatchNorm eps")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, report


def import_onnx_file(path: str | os.PathLike, output: str | os.PathLike, network: str) -> str:
    """`megaface convert import-onnx`: write the megaface backbone file; returns the report text."""
    from megaface.checkpoint import save_backbone_file

    state, report = import_onnx(path, network)
    meta = {"network": network, "embedding_size": report.embedding_size, "source": "onnx",
            "source_file": str(path), "build_options": {"bn_eps": report.bn_eps}}
    out = save_backbone_file(output, state, meta)
    return f"wrote megaface backbone {out}\n{report}"
