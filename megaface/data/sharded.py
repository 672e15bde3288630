"""Sharded training packs: K InsightFace packs that read as one dataset, listed in a ``shards.json`` manifest.

``megaface pack rec --shards K`` splits the classes into K contiguous ranges of about equal image counts;
each shard is a complete pack of its own (``shard-00000/train.rec``, ``.idx``, ``property``, labels 0..c-1)
and the manifest says where its classes start in the whole::

    {"format": "megaface-shards", "version": 1, "num_classes": C, "images": N, "image_size": [112, 112],
     "shards": [{"path": "shard-00000", "class_start": 0, "classes": c0, "images": n0}, ...]}

``data.path`` (and `open_pack`) take the manifest file or the directory that holds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from megaface.data.packs import RecordPack

MANIFEST_NAME = "shards.json"
FORMAT = "megaface-shards"
VERSION = 1


def shard_name(k: int) -> str:
    """Directory of shard `k` inside a sharded pack."""
    return f"shard-{k:05d}"


def manifest_path(path: str | os.PathLike) -> Path | None:
    """The manifest `path` names (the file, or a directory holding it without a train.rec), else None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir() and (path / MANIFEST_NAME).is_file() and not (path / "train.rec").exists():
        return path / MANIFEST_NAME
    return None


def manifest_text(num_classes: int, image_size: tuple[int, int], shards: list[dict]) -> str:
    """The manifest's JSON (`shards`: dicts with path, class_start, classes, images, in class order)."""
    body = {"format": FORMAT, "version": VERSION, "num_classes": int(num_classes),
            "images": int(sum(s["images"] for s in shards)), "image_size": [int(v) for v in image_size],
            "shards": shards}
    return json.dumps(body, indent=1) + "\n"


def _load_manifest(path: Path) -> dict:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a shard manifest ({err}); expected the shards.json `megaface pack rec "
                         "--shards K` writes") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"{path}: not a shard manifest (no \"format\": \"{FORMAT}\"); data.path names a pack "
                         "directory or the shards.json `megaface pack rec --shards K` writes")
    if body.get("version") != VERSION:
        raise ValueError(f"{path}: shard manifest version {body.get('version')!r}; this megaface reads "
                         f"version {VERSION}: upgrade megaface or repack")
    shards = body.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{path}: the manifest lists no shards")
    for n, entry in enumerate(shards):
        if not isinstance(entry, dict) or not {"path", "class_start", "classes", "images"} <= set(entry):
            raise ValueError(f"{path}: shard entry {n} is {entry!r}; each needs path, class_start, classes, images")
    if not isinstance(body.get("num_classes"), int):
        raise ValueError(f"{path}: num_classes is {body.get('num_classes')!r}, expected the total class count")
    return body


class ShardedPack:
    """The shards of a manifest as one dataset: ``pack[i] -> (global label, image bytes)``, shards in order."""

    def __init__(self, path: str | os.PathLike) -> None:
        found = manifest_path(path)
        if found is None:
            raise FileNotFoundError(f"shard manifest not found at {path}; expected {MANIFEST_NAME} or its directory")
        self.manifest = found
        body = _load_manifest(found)
        self.packs: list[RecordPack] = []
        self.class_starts: list[int] = []
        expected_start = 0
        for n, entry in enumerate(body["shards"]):
            pack = RecordPack(found.parent / entry["path"])
            if entry["class_start"] != expected_start or pack.num_classes != entry["classes"] \
                    or len(pack) != entry["images"]:
                raise ValueError(
                    f"{found}: shard {n} ({pack.directory}) holds {pack.num_classes} classes and {len(pack)} "
                    f"images, the manifest says {entry['classes']} classes from {entry['class_start']} and "
                    f"{entry['images']} images (expected start {expected_start}); the shard was replaced: repack")
            self.packs.append(pack)
            self.class_starts.append(expected_start)
            expected_start += pack.num_classes
        sizes = {p.image_size for p in self.packs}
        if expected_start != body["num_classes"] or len(sizes) != 1:
            raise ValueError(f"{found}: shards hold {expected_start} classes of sizes {sorted(sizes)}, the manifest "
                             f"says {body['num_classes']} classes of one size; repack")
        self.num_classes = expected_start
        self.image_size = self.packs[0].image_size
        self._ends = np.cumsum([len(p) for p in self.packs])

    def _locate(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pack index {i} out of range for {len(self)} images")
        i %= len(self)
        k = int(np.searchsorted(self._ends, i, side="right"))
        return k, i - (int(self._ends[k - 1]) if k else 0)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, i: int) -> tuple[int, bytes]:
        k, j = self._locate(i)
        label, image = self.packs[k].read(j)
        return label + self.class_starts[k], image

    def where(self, i: int) -> str:
        k, j = self._locate(i)
        return self.packs[k].where(j)

    def labels(self) -> np.ndarray:
        return np.concatenate([p.labels() + s for p, s in zip(self.packs, self.class_starts, strict=True)])

    def close(self) -> None:
        for pack in self.packs:
            pack.close()
