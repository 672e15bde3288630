"""What `megaface pack rec` packs: an image folder or an MXNet im2rec ``.lst``, as (paths, labels) in pack order.

im2rec list (``python -m mxnet.tools.im2rec --list --recursive PREFIX ROOT``): one image per line,
``index<TAB>label<TAB>path``, the label written as a float (``3.000000``), the path relative to the image root.
im2rec shuffles by default; an InsightFace pack needs its images grouped by class, so the list is sorted by
label, stably (the list's order within a class is kept). Labels must be the whole numbers 0..C-1, each used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageList:
    """Images in pack order: `labels` non-decreasing 0..num_classes-1; `source` names the input in errors."""

    paths: list[str]
    labels: np.ndarray
    num_classes: int
    source: str

    def __len__(self) -> int:
        return len(self.paths)


def from_folder(root: str | os.PathLike) -> ImageList:
    """``root/<identity>/*.jpg``: identities are the sorted folder names (as `FolderDataset`)."""
    from megaface.data.datasets import FolderDataset

    ds = FolderDataset(root)
    return ImageList([str(p) for p in ds.paths], ds.labels(), ds.num_classes, f"image folder {ds.root}")


def from_lst(path: str | os.PathLike, root: str | os.PathLike | None = None) -> ImageList:
    """An im2rec ``.lst`` (paths relative to `root`, default the list's folder) -> images sorted by label."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image list not found: {path}; expected an im2rec .lst (index<TAB>label<TAB>path)")
    base = Path(root) if root is not None else path.parent
    if not base.is_dir():
        raise FileNotFoundError(f"image root {base} for {path} is not a directory; pass --images ROOT")
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            paths.append(str(base / _image_path(line, path, n)))
            labels.append(_label(line.split("\t")[1], path, n))
    if not paths:
        raise ValueError(f"{path}: the list holds no images; expected lines index<TAB>label<TAB>path")
    order = np.argsort(np.asarray(labels, dtype=np.int64), kind="stable")
    sorted_labels = np.asarray(labels, dtype=np.int64)[order]
    present = np.unique(sorted_labels)
    if present[0] != 0 or present.size != present[-1] + 1:
        missing = sorted(set(range(int(present[-1]) + 1)) - set(present.tolist()))[:5]
        raise ValueError(f"{path}: labels must be 0..C-1 with every class used; labels run 0..{present[-1]} "
                         f"but {missing} (and maybe more) have no image; renumber the labels")
    return ImageList([paths[i] for i in order], sorted_labels, int(present.size), f"image list {path}")


def _image_path(line: str, path: Path, n: int) -> str:
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 3:
        hint = " (a multi-value label: one class label per image is packed)" if len(fields) > 3 else ""
        raise ValueError(f"{path}:{n}: expected 'index<TAB>label<TAB>path' (3 tab-separated fields), got "
                         f"{len(fields)}{hint}: {line.strip()[:100]!r}")
    if not fields[0].strip().lstrip("-").isdigit():
        raise ValueError(f"{path}:{n}: index {fields[0]!r} is not an integer; expected 'index<TAB>label<TAB>path'")
    if not fields[2].strip():
        raise ValueError(f"{path}:{n}: empty image path; expected 'index<TAB>label<TAB>path'")
    return fields[2].strip()


def _label(text: str, path: Path, n: int) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}:{n}: label {text!r} is not a number; expected 'index<TAB>label<TAB>path'") from None
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ValueError(f"{path}:{n}: label {text!r} is not a class number (a whole number >= 0)")
    return int(value)
