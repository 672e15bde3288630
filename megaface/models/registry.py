"""Backbone registry: build a network by name with validated options."""
from __future__ import annotations

import difflib
from typing import Any, Callable

from .iresnet import IRESNET_UNITS, IResNet
from .layers import Backbone
from .mobilefacenet import MOBILEFACENET_SPECS, MobileFaceNet
from .vit import VIT_SPECS, VisionTransformer

# Default dropout of the "E" head: the seed trains resnet100 with 0.4, the others without.
_IRESNET_DROPOUT = {100: 0.4}
_CNN_OPTIONS = ("bn_eps", "bn_momentum")
_VIT_OPTIONS = ("drop_path_rate", "mask_ratio", "checkpointing")


def _iresnet_factory(depth: int) -> Callable[..., Backbone]:
    def build(embedding_size: int | None, dropout: float | None, **options: Any) -> Backbone:
        p = _IRESNET_DROPOUT.get(depth, 0.0) if dropout is None else dropout
        return IResNet(depth, embedding_size or 512, p, **options)
    return build


def _mobilefacenet_factory(name: str) -> Callable[..., Backbone]:
    def build(embedding_size: int | None, dropout: float | None, **options: Any) -> Backbone:
        if dropout:
            raise ValueError(
                f"{name} has no dropout layer (the GDC head is linear), got dropout={dropout}; "
                "pass dropout=None or 0"
            )
        return MobileFaceNet(name, MOBILEFACENET_SPECS[name], embedding_size, **options)
    return build


def _vit_factory(name: str) -> Callable[..., Backbone]:
    def build(embedding_size: int | None, dropout: float | None, **options: Any) -> Backbone:
        if dropout:
            raise ValueError(f"{name} has no dropout layer (use drop_path_rate / mask_ratio), got "
                             f"dropout={dropout}; pass dropout=None or 0")
        return VisionTransformer(name, VIT_SPECS[name], embedding_size or 512, **options)
    return build


_FACTORIES: dict[str, Callable[..., Backbone]] = {
    **{name: _mobilefacenet_factory(name) for name in MOBILEFACENET_SPECS},
    **{f"iresnet{depth}": _iresnet_factory(depth) for depth in sorted(IRESNET_UNITS)},
    **{name: _vit_factory(name) for name in VIT_SPECS},
}


def build_option_names(name: str) -> tuple[str, ...]:
    """The keyword options :func:`build_model` accepts for network ``name``."""
    return _VIT_OPTIONS if _check_name(name) in VIT_SPECS else _CNN_OPTIONS


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(_FACTORIES)


def _check_name(name: str) -> str:
    if name not in _FACTORIES:
        close = difflib.get_close_matches(str(name), list(_FACTORIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown network {name!r}{hint}; choose one of {list_models()}")
    return name


def default_embedding_size(name: str) -> int:
    """Embedding width D that :func:`build_model` uses when ``embedding_size`` is None."""
    _check_name(name)
    if name in MOBILEFACENET_SPECS:
        return MOBILEFACENET_SPECS[name].embedding_size
    return 512


def build_model(name: str, embedding_size: int | None = None, dropout: float | None = None,
                **kwargs: Any) -> Backbone:
    """Build backbone ``name``: float [N, 3, 112, 112] -> embeddings [N, D].

    embedding_size: D (None: :func:`default_embedding_size`).
    dropout: dropout before the FC of the IResNet "E" head (None: 0.4 for iresnet100, else 0);
        MobileFaceNets have no dropout and accept only None/0.
    kwargs (CNNs): ``bn_eps`` (override every BatchNorm eps, e.g. 1e-5 to reproduce arcface_torch outputs
        exactly) and ``bn_momentum`` (PyTorch convention, default 0.1 == MXNet 0.9).
    kwargs (vit_*): ``drop_path_rate``, ``mask_ratio`` (train-mode only) and ``checkpointing`` (activation
        checkpointing per block); None or absent = the size's arcface_torch default (models.vit.VIT_SPECS).
    The returned module has ``.network_name`` and ``.embedding_size``.
    """
    _check_name(name)
    valid = build_option_names(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown build_model option(s) {unknown} for {name!r}; valid: {list(valid)}")
    if embedding_size is not None and (not isinstance(embedding_size, int) or embedding_size <= 0):
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    for key in _CNN_OPTIONS:
        if key in kwargs and not float(kwargs[key]) > 0:
            raise ValueError(f"{key} must be > 0, got {kwargs[key]!r}")
    return _FACTORIES[name](embedding_size, dropout, **kwargs)
