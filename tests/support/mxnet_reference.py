"""An independent numpy forward pass of an MXNet symbol JSON (the ops InsightFace's networks use), plus an
independent struct-based NDArray-list packer. Written from MXNet's operator semantics, not from megaface's
converter: tests compare it with the megaface backbone an import produces.

    params = init_params(symbol, rng)                     # random, realistic values for every variable
    out = run_symbol(symbol, params, images_rgb_0_255)    # [N, D] float64
"""
from __future__ import annotations

import struct
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _tuple(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    return tuple(int(v) for v in text.strip("()[] ").split(",") if v.strip())


def _attrs(node: dict) -> dict:
    return node.get("attrs") or node.get("attr") or node.get("param") or {}


def conv2d(x: np.ndarray, w: np.ndarray, stride: int, pads: tuple[int, int, int, int], groups: int) -> np.ndarray:
    """x [N, C, H, W], w [O, C/groups, k, k]; pads = (top, bottom, left, right)."""
    top, bottom, left, right = pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    k = w.shape[2]
    win = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]  # N C Ho Wo k k
    c = win.shape[1]
    if groups == 1:
        return np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    if groups == c and w.shape[1] == 1 and w.shape[0] == c:
        return np.einsum("nchwij,cij->nchw", win, w[:, 0])
    outs = []
    cg, og = c // groups, w.shape[0] // groups
    for g in range(groups):
        outs.append(np.tensordot(win[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og], axes=([1, 4, 5], [1, 2, 3])))
    return np.concatenate(outs, axis=3).transpose(0, 3, 1, 2)


def same_pads(size: int, kernel: int, stride: int, lower: bool) -> tuple[int, int]:
    """OneFlow/TF 'same' padding (before, after); SAME_LOWER puts the odd extra before the data."""
    out = (size + stride - 1) // stride
    total = max(0, (out - 1) * stride + kernel - size)
    small, large = total // 2, total - total // 2
    return (large, small) if lower else (small, large)


def _bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def run_symbol(symbol: dict, params: dict[str, np.ndarray], data: np.ndarray, same_padding: str | None = None,
               make: Callable[[str, tuple], np.ndarray] | None = None) -> np.ndarray:
    """Forward ``data`` through the symbol in inference mode (BatchNorm uses moving stats, Dropout is identity).

    same_padding: None = the symbol's explicit pads; 'lower'/'upper' = OneFlow 'same' padding for every
    convolution whose symbol pad is non-zero. make(name, shape): creates a missing variable (init_params).
    """
    nodes, values = symbol["nodes"], {}

    def param(i: int, shape: tuple) -> np.ndarray:
        name = nodes[i]["name"]
        if name not in params and make is not None:
            params[name] = make(name, shape)
        return np.asarray(params[name], np.float64)

    for i, node in enumerate(nodes):
        op, a = node["op"], _attrs(node)
        ins = [j for j, _, _ in node["inputs"]]
        if op == "null":
            if node["name"] == "data":
                values[i] = np.asarray(data, np.float64)
            continue
        x = values[ins[0]]
        if op == "_minus_scalar":
            y = x - float(a["scalar"])
        elif op == "_mul_scalar":
            y = x * float(a["scalar"])
        elif op == "Convolution":
            k, stride = _tuple(a["kernel"], (1, 1))[0], _tuple(a.get("stride"), (1, 1))[0]
            pad, groups, filters = _tuple(a.get("pad"), (0, 0))[0], int(a.get("num_group", 1)), int(a["num_filter"])
            w = param(ins[1], (filters, x.shape[1] // groups, k, k))
            pads = (pad,) * 4
            if same_padding and pad:
                ph = same_pads(x.shape[2], k, stride, same_padding == "lower")
                pw = same_pads(x.shape[3], k, stride, same_padding == "lower")
                pads = ph + pw
            y = conv2d(x, w, stride, pads, groups)
            if a.get("no_bias", "False") not in ("True", "1"):
                y = y + _bcast(param(ins[2], (filters,)), 4)
        elif op == "BatchNorm":
            c = (x.shape[1],)
            gamma, beta, mean, var = (param(j, c) for j in ins[1:5])
            if a.get("fix_gamma", "True") in ("True", "1"):  # MXNet's default: the scale is fixed at 1
                gamma = np.ones(c)
            eps = float(a.get("eps", 1e-3))
            y = (x - _bcast(mean, x.ndim)) / np.sqrt(_bcast(var, x.ndim) + eps) * _bcast(gamma, x.ndim) \
                + _bcast(beta, x.ndim)
        elif op == "LeakyReLU":
            assert a.get("act_type") == "prelu"
            y = np.where(x > 0, x, _bcast(param(ins[1], (x.shape[1],)), x.ndim) * x)
        elif op == "Activation":
            assert a.get("act_type") == "relu"
            y = np.maximum(x, 0)
        elif op in ("elemwise_add", "_Plus", "_plus"):
            y = x + values[ins[1]]
        elif op == "Dropout":
            y = x
        elif op == "Flatten":
            y = x.reshape(x.shape[0], -1)
        elif op == "FullyConnected":
            flat = x.reshape(x.shape[0], -1)
            hidden = int(a["num_hidden"])
            y = flat @ param(ins[1], (hidden, flat.shape[1])).T
            if a.get("no_bias", "False") not in ("True", "1"):
                y = y + param(ins[2], (hidden,))
        elif op == "Pooling":
            assert a.get("global_pool") in ("True", "1") and a.get("pool_type", "max") == "avg"
            y = x.mean(axis=(2, 3), keepdims=True)
        else:
            raise NotImplementedError(op)
        values[i] = y
    return values[symbol["heads"][0][0]]


def init_params(symbol: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random but well-scaled values for every variable of the symbol (shapes found by a forward pass)."""

    def make(name: str, shape: tuple) -> np.ndarray:
        if name.endswith("_weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
        elif name.endswith("_moving_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("_gamma") and "relu" in name:
            value = rng.uniform(0.1, 0.4, shape)
        elif name.endswith("_gamma"):
            value = rng.uniform(0.8, 1.2, shape)
        else:  # beta, moving_mean, biases: small offsets
            value = rng.normal(0.0, 0.1, shape)
        return value.astype(np.float32)

    params: dict[str, np.ndarray] = {}
    run_symbol(symbol, params, np.zeros((1, 3, 112, 112)), make=make)
    return params


def pack_ndarray(array: np.ndarray, version: str = "v2") -> bytes:
    """One NDArray record: 'v2' (magic, stype, int64 dims), 'v1' (magic, int64 dims), 'legacy' (uint32 dims)."""
    flag = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}[array.dtype]
    if version == "v2":
        head = struct.pack("<Iii", 0xF993FAC9, 0, array.ndim) + struct.pack(f"<{array.ndim}q", *array.shape)
    elif version == "v1":
        head = struct.pack("<Ii", 0xF993FAC8, array.ndim) + struct.pack(f"<{array.ndim}q", *array.shape)
    else:
        head = struct.pack(f"<I{array.ndim}I", array.ndim, *array.shape)
    return head + struct.pack("<iii", 2, 1, flag) + array.astype(array.dtype.newbyteorder("<")).tobytes()


def pack_list(arrays: dict[str, np.ndarray], versions: dict[str, str] | None = None) -> bytes:
    """A whole .params file: list magic 0x112, reserved, count, records, then the names."""
    versions = versions or {}
    out = [struct.pack("<QQQ", 0x112, 0, len(arrays))]
    out += [pack_ndarray(v, versions.get(k, "v2")) for k, v in arrays.items()]
    out.append(struct.pack("<Q", len(arrays)))
    out += [struct.pack("<Q", len(k.encode())) + k.encode() for k in arrays]
    return b"".join(out)
