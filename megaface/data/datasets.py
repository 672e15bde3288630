"""Training datasets: RecordIO packs, image folders, synthetic identities (`build_dataset`).

Every dataset has ``len``, ``ds[i] -> (label, bytes | uint8 [H, W, 3] RGB)``, ``num_classes`` and
``where(i)`` (a human-readable location used in error messages: file and key/offset or path).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megaface.data import synthetic
from megaface.data.packs import RecordPack, open_pack
from megaface.data.synthetic import SyntheticDataset, ensure_synthetic
from megaface.vocab import DATA_SOURCES, IMAGE_SUFFIXES


class FolderDataset:
    """``root/<identity>/*.jpg``: identities are the sorted sub-folder names, labels 0..C-1 in that order."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}; expected root/<identity>/*.jpg")
        self.identities = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.identities:
            raise ValueError(f"{self.root}: no identity sub-folders; expected root/<identity>/*.jpg")
        paths, labels = [], []
        for label, name in enumerate(self.identities):
            folder = self.root / name
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise ValueError(
                    f"{self.root / name}: identity folder holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                    "remove the folder or add its images (every folder becomes a class)"
                )
            paths += files
            labels += [label] * len(files)
        self.paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.identities)
        self.image_size = None  # not known without decoding

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, bytes]:
        return int(self._labels[i]), self.paths[i].read_bytes()

    def where(self, i: int) -> str:
        return str(self.paths[i])

    def labels(self) -> np.ndarray:
        return self._labels.copy()


class _SyntheticWithWhere(SyntheticDataset):
    def where(self, i: int) -> str:
        return f"synthetic image {i} (seed {self.seed})"


def build_dataset(source: str, path: str | os.PathLike | None = None, **options):
    """Dataset by source name.

    - ``"recordio"``: an InsightFace pack directory (``train.rec``/``.idx``/``property``); option ``prefix``.
    - ``"folder"``: ``root/<identity>/*.jpg``.
    - ``"ofrecord"``: a directory of OneFlow ``part-*`` files; options ``num_classes`` (None: scan the
      labels), ``part_num``, ``part_name_suffix_length``, ``share`` and ``gather`` (see `OFRecordDataset`).
    - ``"synthetic"``: options ``identities`` (default 1000), ``images_per_identity`` (20), ``seed`` (0),
      ``val_pairs`` (3000). With ``path=None`` images are drawn on the fly; with a path, a RecordIO pack +
      ``val.bin`` are written there once (``ensure_synthetic``) and the pack is returned, so the same
      decode path as real data is exercised.
    """
    allowed = {"recordio": {"prefix"}, "folder": set(),
               "ofrecord": {"num_classes", "part_num", "part_name_suffix_length", "share", "gather"},
               "synthetic": {"identities", "images_per_identity", "seed", "val_pairs"}}.get(source)
    if allowed is None:
        raise ValueError(f"unknown dataset source {source!r}; choose one of {', '.join(DATA_SOURCES)}")
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"build_dataset({source!r}): unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(sorted(allowed)) or 'none'}"
        )
    if source == "recordio":
        if path is None:
            raise ValueError("build_dataset('recordio') needs the pack directory (holding train.rec/.idx/property)")
        return open_pack(path, **options)
    if source == "ofrecord":
        from megaface.data.ofrecord import OFRecordDataset

        if path is None:
            raise ValueError("build_dataset('ofrecord') needs the directory holding the part-* files")
        return OFRecordDataset(path, **options)
    if source == "folder":
        if path is None:
            raise ValueError("build_dataset('folder') needs the image root (root/<identity>/*.jpg)")
        return FolderDataset(path)
    if source == "synthetic":
        ids = int(options.get("identities", synthetic.DEFAULT_IDENTITIES))
        k = int(options.get("images_per_identity", synthetic.DEFAULT_IMAGES_PER_IDENTITY))
        seed = int(options.get("seed", synthetic.DEFAULT_SEED))
        if path is None:
            return _SyntheticWithWhere(ids, k, seed)
        pack_dir, _ = ensure_synthetic(path, ids, k, int(options.get("val_pairs", synthetic.DEFAULT_VAL_PAIRS)), seed)
        return open_pack(pack_dir)


def dataset_where(dataset, i: int) -> str:
    """Location of item `i` for error messages, for any dataset (ours have `where`)."""
    if isinstance(dataset, RecordPack) or hasattr(dataset, "where"):
        return dataset.where(i)
    return f"{type(dataset).__name__} item {i}"
