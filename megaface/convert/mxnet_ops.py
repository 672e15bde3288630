"""MXNet operator attributes as a `-symbol.json` stores them: an absent attribute means MXNet's default.

MXNet writes into a symbol only the attributes the author passed (`mx.sym.Convolution(kernel=(1, 1),
num_filter=64, ...)` without `pad` stores no `pad`), so InsightFace's fresnet shortcut convolutions carry no
`pad`, no `num_group`, its BatchNorms no `eps` in some variants, and so on. Reading a node means: the file's
value where present, else the documented default below (MXNet 1.x operator reference, the version that
wrote the model zoo); a required attribute that is absent is a damaged symbol.

    attrs = node_attrs("Convolution", {"kernel": "(1, 1)", "num_filter": "64"}, where="conv0")
    attrs["pad"] == (0, 0); attrs["stride"] == (1, 1); attrs["num_group"] == 1; attrs["no_bias"] is False

Spatial tuples (`stride`, `dilate`, `pad`; MXNet's default is the empty shape) are expanded to the kernel's
rank: stride and dilate to ones, pad to zeros.
"""
from __future__ import annotations

from typing import Any, Mapping

_SPATIAL = ("stride", "dilate", "pad")

# op -> {attribute: default}; the default's type is the attribute's type (tuple = shape of ints). Attributes
# whose default is None (Pooling's p_value, BatchNorm's calibration ranges) are not listed: kept as given.
# tests/e2e/test_interop_mxnet.py checks this table against MXNet 1.9.1's own operator documentation.
OP_DEFAULTS: dict[str, dict[str, Any]] = {
    "Convolution": {"stride": (), "dilate": (), "pad": (), "num_group": 1, "no_bias": False,
                    "workspace": 1024, "cudnn_tune": "None", "cudnn_off": False, "layout": "None"},
    "BatchNorm": {"eps": 1e-3, "momentum": 0.9, "fix_gamma": True, "use_global_stats": False,
                  "output_mean_var": False, "axis": 1, "cudnn_off": False},
    "LeakyReLU": {"act_type": "leaky", "slope": 0.25, "lower_bound": 0.125, "upper_bound": 0.334},
    "FullyConnected": {"no_bias": False, "flatten": True},
    "Dropout": {"p": 0.5, "mode": "training", "axes": (), "cudnn_off": False},
    "Pooling": {"kernel": (), "pool_type": "max", "global_pool": False, "stride": (), "pad": (),
                "pooling_convention": "valid", "cudnn_off": False, "layout": "None"},
    "Activation": {},
    "_minus_scalar": {"scalar": 1.0, "is_int": True},
    "_mul_scalar": {"scalar": 1.0, "is_int": True},
}
# attributes without a default: a node lacking one is not a valid symbol
REQUIRED: dict[str, dict[str, type]] = {
    "Convolution": {"kernel": tuple, "num_filter": int},
    "FullyConnected": {"num_hidden": int},
    "Activation": {"act_type": str},
}
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _parse(value: str, kind: type, where: str, name: str) -> Any:
    text = str(value).strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
        if kind is tuple:
            return tuple(int(v.strip().rstrip("L")) for v in text.strip("()[] ").split(",") if v.strip())
        if kind is int:
            return int(text.rstrip("L"))
        return kind(text)
    except ValueError:
        raise ValueError(f"{where}: attribute {name}={value!r} is not a valid {kind.__name__}; the symbol "
                         "is damaged or not written by MXNet") from None


def node_attrs(op: str, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Every attribute of one ``op`` node: parsed file values over MXNet's defaults (see module docstring).

    Attributes outside the table are kept as strings. ``where`` names the file and node in errors.
    """
    defaults = OP_DEFAULTS.get(op, {})
    required = REQUIRED.get(op, {})
    attrs: dict[str, Any] = {k: str(v) for k, v in raw.items() if k not in defaults and k not in required}
    for name, kind in required.items():
        if name not in raw:
            raise ValueError(f"{where}: {op} has no {name!r}, which MXNet requires; the symbol is damaged")
        attrs[name] = _parse(raw[name], kind, where, name)
    for name, default in defaults.items():
        attrs[name] = _parse(raw[name], type(default), where, name) if name in raw else default
    kernel = attrs.get("kernel")
    if isinstance(kernel, tuple) and kernel:
        for name in _SPATIAL:
            if name in attrs and attrs[name] == ():
                attrs[name] = (0 if name == "pad" else 1,) * len(kernel)
    return attrs


def raw_attrs(node: Mapping[str, Any]) -> dict[str, str]:
    """A node's stored attributes: MXNet >= 1.0 writes "attrs"; older symbols wrote "attr" or "param"."""
    return {k: str(v) for k, v in (node.get("attrs") or node.get("attr") or node.get("param") or {}).items()}
