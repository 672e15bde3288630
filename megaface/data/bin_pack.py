"""Verification packs (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...): read and write.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds 2P encoded images in pair order
a0, b0, a1, b1, ...; each entry is ``bytes`` or a numpy uint8 array. Files written by Python 2 hold
py2 ``str`` objects: a plain Python-3 load decodes them as ASCII and fails on JPEG bytes, so loading
falls back to ``encoding='bytes'``, which hands them over as ``bytes`` untouched.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from megaface.fileio import atomic_output_file


def _as_bytes(entry: object, path: Path, i: int) -> bytes:
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return bytes(entry)
    if isinstance(entry, np.ndarray):
        return entry.astype(np.uint8, copy=False).tobytes()
    if isinstance(entry, str):  # py2 str loaded with encoding='latin1'
        return entry.encode("latin1")
    raise ValueError(f"{path}: image entry {i} has type {type(entry).__name__}; expected bytes or a uint8 numpy array")


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Read a verification pack -> (encoded images in pair order, issame per pair)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification pack not found: {path}")
    with open(path, "rb") as f:
        try:
            obj = pickle.load(f)
        except UnicodeDecodeError:
            f.seek(0)
            obj = pickle.load(f, encoding="bytes")
        except Exception as err:
            raise ValueError(f"{path}: not a readable .bin verification pack (pickle failed: {err})") from err
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    images = [_as_bytes(entry, path, i) for i, entry in enumerate(bins)]
    flags = [bool(v) for v in np.asarray(issame).ravel()]
    if len(images) != 2 * len(flags):
        raise ValueError(
            f"{path}: {len(images)} images for {len(flags)} pairs; a .bin needs exactly 2 images per pair "
            "(a0, b0, a1, b1, ...); the file is damaged or not a verification pack"
        )
    return images, flags


def save_bin(path: str | os.PathLike, images: list[bytes], issame: list[bool]) -> None:
    """Write a verification pack atomically (temporary file, then rename)."""
    path = Path(path)
    images = [bytes(x) if not isinstance(x, np.ndarray) else x.astype(np.uint8).tobytes() for x in images]
    flags = [bool(v) for v in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(f"save_bin({path}): {len(images)} images for {len(flags)} pairs; need 2 images per pair")
    with atomic_output_file(path) as tmp, open(tmp, "wb") as f:
        # protocol 4: readable by every Python 3 and by InsightFace's loader (pickle.load(encoding='bytes')).
        pickle.dump((images, flags), f, protocol=4)
