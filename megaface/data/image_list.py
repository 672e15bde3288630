"""What `megaface pack rec` packs: an image folder or an MXNet im2rec ``.lst``, as (paths, labels) in pack order.

im2rec list (``python -m mxnet.tools.im2rec --list --recursive PREFIX ROOT``): one image per line,
``index<TAB>label<TAB>path``, the label written as a float (``3.000000``), the path relative to the image root.
im2rec shuffles by default; an InsightFace pack needs its images grouped by class, so the list is sorted by
label, stably (the list's order within a class is kept). Labels must be the whole numbers 0..C-1, each used.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from megaface.vocab import IMAGE_SUFFIXES


class PathTable(Sequence[str]):
    """Paths in one buffer: their UTF-8 bytes plus 8 bytes each (42M Python strings would take ~4 GB)."""

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self._buf, self._ends = bytearray(), array("q")
        for path in paths:
            self.append(path)

    def append(self, path: str) -> None:
        self._buf += path.encode("utf-8", "surrogateescape")  # undecodable file names survive the round trip
        self._ends.append(len(self._buf))

    def raw(self) -> tuple[bytes, bytes]:
        """(the bytes of every path, their end offsets): what the resume fingerprint hashes."""
        return bytes(self._buf), self._ends.tobytes()

    def section(self, start: int, stop: int) -> PathTable:
        """Paths [start, stop) as a table of their own: two buffers to pickle, not a string per path."""
        part, base = PathTable(), self._ends[start - 1] if start else 0
        part._buf = self._buf[base:self._ends[stop - 1]] if stop > start else bytearray()
        part._ends.frombytes((np.frombuffer(self._ends, dtype=np.int64)[start:stop] - base).tobytes())
        return part

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self._at(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"path {i} out of range for {len(self)} paths")
        return self._at(i % len(self))

    def _at(self, j: int) -> str:
        start = self._ends[j - 1] if j else 0
        return self._buf[start:self._ends[j]].decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class ImageList:
    """Images in pack order: `labels` non-decreasing 0..num_classes-1; `source` names the input in errors."""

    paths: PathTable
    labels: np.ndarray
    num_classes: int
    source: str

    def __len__(self) -> int:
        return len(self.paths)


def from_folder(root: str | os.PathLike) -> ImageList:
    """``root/<identity>/*.jpg``: the images `FolderDataset` lists, in its order (identities = sorted folder
    names, files sorted by name), read with ``os.scandir``: no stat per file where the file system reports
    the entry type, no Path object per image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}; expected root/<identity>/*.jpg")
    identities = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not identities:
        raise ValueError(f"{root}: no identity sub-folders; expected root/<identity>/*.jpg")
    paths, counts = PathTable(), []
    for name in identities:
        files = sorted(e.name for e in os.scandir(root / name)
                       if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())
        if not files:
            raise ValueError(f"{root / name}: identity folder holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                             "remove the folder or add its images (every folder becomes a class)")
        for file in files:
            paths.append(str(root / name / file))
        counts.append(len(files))
    labels = np.repeat(np.arange(len(identities), dtype=np.int64), counts)
    return ImageList(paths, labels, len(identities), f"image folder {root}")


def from_lst(path: str | os.PathLike, root: str | os.PathLike | None = None) -> ImageList:
    """An im2rec ``.lst`` (paths relative to `root`, default the list's folder) -> images sorted by label."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image list not found: {path}; expected an im2rec .lst (index<TAB>label<TAB>path)")
    base = Path(root) if root is not None else path.parent
    if not base.is_dir():
        raise FileNotFoundError(f"image root {base} for {path} is not a directory; pass --images ROOT")
    paths, labels = PathTable(), []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
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
    return ImageList(PathTable(paths[int(i)] for i in order), sorted_labels, int(present.size), f"image list {path}")


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
