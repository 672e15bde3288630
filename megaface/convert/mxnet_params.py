"""MXNet `.params` files (an NDArray list) read and written in pure Python + numpy; no MXNet needed.

Layout (all little-endian; facts from MXNet's NDArray::Save/Load and the dmlc stream vector format):

    uint64 0x112 (list magic)          uint64 0 (reserved)
    uint64 N, then N NDArrays:
        uint32 magic                   0xF993FAC9 (v2) | 0xF993FACA (v3, numpy shapes) | 0xF993FAC8 (v1) |
                                       anything else: legacy, the value is ndim
        int32 storage type             v2/v3 only; 0 = dense (sparse arrays are refused)
        shape                          v1/v2/v3: uint32 ndim + ndim x int64;  legacy: ndim x uint32
        (ndim == 0: an empty array, nothing follows)
        int32 dev_type, int32 dev_id   the context it was saved from (ignored)
        int32 dtype flag               0 f32, 1 f64, 2 f16, 3 u8, 4 i32, 5 i8, 6 i64
        raw data, C order
    uint64 M (0 or N), then M names:   uint64 length + UTF-8 bytes ("arg:conv0_weight", "aux:bn0_moving_mean")

    arrays = read_params("model-0000.params")      # {"arg:conv0_weight": ndarray, ...}
    write_params("model-0000.params", arrays)      # v2 magic, CPU context, the arrays' dtypes
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from megaface.fileio import atomic_output_file

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}
_FLAGS = {np.dtype(v): k for k, v in DTYPES.items()}
_CPU = 1  # MXNet's kCPU device type


class _Reader:
    """Cursor over the file bytes whose errors name the file, the field and the byte offset."""

    def __init__(self, data: bytes, path: str) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.pos}: {what} needs {size} bytes, "
                             f"{len(self.data) - self.pos} left (file size {len(self.data)}); copy the file again")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def _read_array(r: _Reader, index: int) -> np.ndarray:
    start = r.pos
    (magic,) = r.unpack("I", f"array #{index} magic")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("i", f"array #{index} storage type")
        if stype != 0:
            raise ValueError(f"{r.path}: array #{index} at byte {start} has sparse storage type {stype}; only "
                             "dense arrays occur in model files")
    if magic in (V1_MAGIC, V2_MAGIC, V3_MAGIC):
        (ndim,) = r.unpack("i", f"array #{index} ndim")
        if ndim == -1:  # v3: unknown shape, saved as an empty array
            return np.zeros((0,), np.float32)
        if not 0 <= ndim <= 32:
            raise ValueError(f"{r.path}: array #{index} at byte {start} has ndim {ndim}; the file is damaged")
        shape = r.unpack(f"{ndim}q", f"array #{index} shape")
    else:  # legacy file: the first word was ndim, dims are uint32
        if magic > 32:
            raise ValueError(f"{r.path}: byte {start}: {magic:#x} is no NDArray magic (expected {V2_MAGIC:#x}); "
                             "not an MXNet .params file, or damaged")
        ndim = magic
        shape = r.unpack(f"{ndim}I", f"array #{index} shape")
    if ndim == 0 or any(d < 0 for d in shape):
        return np.zeros((0,), np.float32)
    r.unpack("ii", f"array #{index} context")
    (flag,) = r.unpack("i", f"array #{index} dtype")
    if flag not in DTYPES:
        raise ValueError(f"{r.path}: array #{index} at byte {start} has dtype flag {flag}; known: {DTYPES}")
    dtype = np.dtype(DTYPES[flag]).newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64))
    raw = r.take(count * dtype.itemsize, f"array #{index} data {list(shape)} {dtype.name}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of an MXNet NDArray list file (names keep their 'arg:'/'aux:' prefixes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected an MXNet PREFIX-EPOCH.params file)")
    r = _Reader(path.read_bytes(), str(path))
    magic, _reserved = r.unpack("QQ", "list header")
    if magic != LIST_MAGIC:
        raise ValueError(f"{path}: byte 0: list magic {magic:#x}, expected {LIST_MAGIC:#x}; not an MXNet "
                         ".params file (a torch/OneFlow file?)")
    (count,) = r.unpack("Q", "array count")
    arrays = [_read_array(r, i) for i in range(count)]
    (num_names,) = r.unpack("Q", "name count")
    if num_names != count:
        raise ValueError(f"{path}: byte {r.pos - 8}: {num_names} names for {count} arrays; model files name "
                         "every array")
    names = []
    for i in range(num_names):
        (length,) = r.unpack("Q", f"name #{i} length")
        names.append(r.take(length, f"name #{i}").decode("utf-8", errors="replace"))
    if r.pos != len(r.data):
        raise ValueError(f"{path}: {len(r.data) - r.pos} unexpected bytes after the name list at byte {r.pos}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate array names {sorted({n for n in names if names.count(n) > 1})[:8]}")
    return dict(zip(names, arrays, strict=False))


def pack_params(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of an NDArray list file (v2 arrays, CPU context) holding ``arrays`` in order."""
    parts = [struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays))]
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _FLAGS:
            raise ValueError(f"array {name!r} has dtype {array.dtype}; MXNet files hold {sorted(map(str, _FLAGS))}")
        parts.append(struct.pack(f"<Iii{array.ndim}q", V2_MAGIC, 0, array.ndim, *array.shape))
        parts.append(struct.pack("<iii", _CPU, 0, _FLAGS[array.dtype]))
        parts.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    parts.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        encoded = name.encode("utf-8")
        parts.append(struct.pack("<Q", len(encoded)) + encoded)
    return b"".join(parts)


def write_params(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` (names with 'arg:'/'aux:' prefixes) as an MXNet .params file, atomically."""
    data = pack_params(arrays)
    with atomic_output_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
