"""The named choices users write in configs and on command lines, each defined once.

Config fields are typed `Literal[...]` over these tuples (checked when a config loads); the modules that act
on a value import the same tuple. Bottom layer: imports nothing from megaface.
"""

from __future__ import annotations

from typing import Literal, get_args

NormalizeMode = Literal["arcface_torch", "oneflow"]
"""Pixel normalisation of uint8 RGB: arcface_torch = (x/255 - 0.5)/0.5 (InsightFace PyTorch),
oneflow = (x - 127.5)/128 (the OneFlow seed). Must match how the model was trained."""
NORMALIZE_MODES: tuple[str, ...] = get_args(NormalizeMode)

DataSource = Literal["synthetic", "recordio", "folder", "ofrecord"]
"""Training data: built-in synthetic identities, an InsightFace RecordIO pack (train.rec/.idx/property),
an image folder (one sub-folder per identity), or a OneFlow OFRecord directory (part-N files)."""
DATA_SOURCES: tuple[str, ...] = get_args(DataSource)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
"""Image files taken from folders (training folders, `megaface embed --images`, `megaface pack rec`)."""

HeadParallel = Literal["model", "data"]
"""FC7 placement: "model" = rows sharded over ranks with their own optimizer; "data" = replicated inside
the DeepSpeed engine (the seed's data-parallel runs)."""
HEAD_PARALLEL: tuple[str, ...] = get_args(HeadParallel)

MARGIN_PRESETS: dict[str, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.35),
    "combined": (1.0, 0.3, 0.2),
    "sphereface": (1.35, 0.0, 0.0),
}
"""Combined-margin presets (m1, m2, m3): target logit cos(m1*theta + m2) - m3."""

ProgressMode = Literal["auto", "on", "off"]
PROGRESS_MODES: tuple[str, ...] = get_args(ProgressMode)
