"""InsightFace training packs: ``train.rec`` + ``train.idx`` + ``property`` (read and write).

Layout (the one InsightFace's tools write): key 0 is a header record whose float32 label array is
``[first_identity_key, end_identity_key)`` and whose image is empty; keys ``1 .. first_identity_key - 1`` are
images (class = scalar label, or first array value); identity records carry ``[img_start, img_end)``.
Packs without that header (shuffled packs made for DALI) are read too: then every key is an image.
The ``.idx`` file is the truth: header ranges are float32 and only exact up to 2^24, so for larger packs the
identity boundary is located by probing the records next to the approximate value.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megaface.data.recordio import RecordReader, RecordWriter, pack_payload, read_index, unpack_payload
from megaface.fileio import make_temp_dir, move_into_place, output_error

if TYPE_CHECKING:
    from megaface.data.ofrecord import OFRecordDataset

_FLOAT32_EXACT = 1 << 24


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """``property`` -> (num_classes, height, width)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pack property file not found: {path}; it holds one line 'num_classes,height,width' "
            "(e.g. '85742,112,112') and sits next to train.rec"
        )
    text = path.read_text().strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width' (e.g. '85742,112,112'), got {text!r}") from None
    if num_classes <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"{path}: values must be positive, got {text!r}")
    return num_classes, height, width


class RecordPack:
    """Image records of an InsightFace pack in ``.idx`` order: ``pack[i] -> (label, image bytes)``."""

    def __init__(self, directory: str | os.PathLike, prefix: str = "train"):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"pack directory not found: {self.directory}")
        self.rec_path = self.directory / f"{prefix}.rec"
        self.idx_path = self.directory / f"{prefix}.idx"
        self.num_classes, h, w = read_property(self.directory / "property")
        self.image_size = (h, w)
        self.reader = RecordReader(self.rec_path)
        keys, offsets = read_index(self.idx_path)
        self._check_offsets(keys, offsets)
        self._check_unique(keys)
        # key -> offset lookups happen only while opening (header, boundary probe): sorted arrays and
        # searchsorted instead of a dict, which would cost ~100 bytes per record (GBs for Glint360K)
        order = np.argsort(keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = keys[order], offsets[order]
        self.has_header = False
        self.identity_range: tuple[int, int] | None = None
        keep = self._image_key_mask(keys)
        self.keys = keys[keep]
        self.offsets = offsets[keep]
        del self._sorted_keys, self._sorted_offsets

    # -- opening -------------------------------------------------------------------------------------
    def _check_offsets(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        if keys.size == 0:
            raise ValueError(f"{self.idx_path}: the index is empty; the pack holds no records")
        bad = np.flatnonzero((offsets < 0) | (offsets + 8 > self.reader.size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{self.idx_path}: key {int(keys[i])} points at offset {int(offsets[i])}, past the end of "
                f"{self.rec_path} ({self.reader.size} bytes); the .rec is truncated or the .idx belongs to "
                "another pack"
            )

    def _check_unique(self, keys: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        if same.size:
            first, second = int(order[same[0]]), int(order[same[0] + 1])
            raise ValueError(
                f"{self.idx_path}: key {int(keys[first])} appears twice (lines {first + 1} and {second + 1}); "
                f"{same.size} duplicate key(s) in all; an .idx maps each key to one record: regenerate it "
                "from the .rec or repack the data"
            )

    def _offset_of(self, key: int) -> int | None:
        i = int(np.searchsorted(self._sorted_keys, key))
        if i < self._sorted_keys.size and self._sorted_keys[i] == key:
            return int(self._sorted_offsets[i])
        return None

    def _record(self, key: int):
        where = f"{self.rec_path}: key {key}"
        offset = self._offset_of(key)
        if offset is None:  # callers check first; a missing key must not reach os.pread as None
            raise KeyError(f"{where}: not in {self.idx_path}")
        return unpack_payload(self.reader.read_at(offset, key), where)

    def _is_identity_record(self, key: int) -> bool:
        if self._offset_of(key) is None:
            return False
        header, image = self._record(key)
        return header.flag == 2 and len(image) == 0

    def _image_key_mask(self, keys: np.ndarray) -> np.ndarray:
        if self._offset_of(0) is None:
            return np.ones(keys.size, dtype=bool)
        header, image = self._record(0)
        if header.flag < 2 or len(image) != 0:
            return np.ones(keys.size, dtype=bool)  # key 0 is an ordinary image: header-less pack
        self.has_header = True
        start, end = (int(round(float(v))) for v in header.labels[:2])
        if start >= _FLOAT32_EXACT:
            start = self._locate_boundary(start)
        self.identity_range = (start, end)
        num_ids = end - start
        if end < _FLOAT32_EXACT and num_ids != self.num_classes:
            raise ValueError(
                f"{self.rec_path}: header record lists {num_ids} identities (keys {start}..{end - 1}) but "
                f"{self.directory / 'property'} says {self.num_classes} classes; fix the property file or "
                "repack the data"
            )
        return (keys >= 1) & (keys < start)

    def _locate_boundary(self, approx: int) -> int:
        # float32 rounding moves the value by at most a few keys at these sizes; the first identity
        # record is the one whose predecessor is an image.
        for key in range(approx - 8, approx + 9):
            if self._is_identity_record(key) and not self._is_identity_record(key - 1):
                return key
        raise ValueError(
            f"{self.rec_path}: cannot locate the first identity record near key {approx} (header value is "
            "float32-rounded); the pack's header does not match its records"
        )

    # -- access --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.keys.size)

    def read(self, i: int) -> tuple[int, bytes]:
        key = int(self.keys[i])
        header, image = unpack_payload(self.reader.read_at(int(self.offsets[i]), key), f"{self.rec_path}: key {key}")
        value = header.class_label
        label = int(value)
        if label != value:  # int() would silently move 2.5 into class 2
            raise ValueError(
                f"{self.rec_path}: key {key} (offset {int(self.offsets[i])}) has label {value!r}, not an integer; "
                "class labels are whole numbers 0..num_classes-1: repack the data with integer labels"
            )
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"{self.rec_path}: key {key} (offset {int(self.offsets[i])}) has label {label}, outside "
                f"[0, {self.num_classes}) from {self.directory / 'property'}; fix the property file or the labels"
            )
        return label, image

    def __getitem__(self, i: int) -> tuple[int, bytes]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"pack index {i} out of range for {len(self)} images")
        return self.read(i % len(self))

    def where(self, i: int) -> str:
        """Human-readable location of image `i`, for error messages."""
        return f"{self.rec_path}: key {int(self.keys[i])} at offset {int(self.offsets[i])}"

    def labels(self) -> np.ndarray:
        """All labels (reads every record header: one pread per image)."""
        return np.array([self.read(i)[0] for i in range(len(self))], dtype=np.int64)

    def close(self) -> None:
        self.reader.close()


def open_pack(directory: str | os.PathLike, prefix: str = "train") -> RecordPack | OFRecordDataset:
    """Open an InsightFace pack directory (``train.rec``, ``train.idx``, ``property``), or an OFRecord
    training directory (``part-*`` files, no ``train.rec``: see `megaface.data.ofrecord`)."""
    from megaface.data.ofrecord import OFRecordDataset, is_ofrecord_dir

    if not (Path(directory) / f"{prefix}.rec").exists() and is_ofrecord_dir(directory):
        return OFRecordDataset(directory)
    return RecordPack(directory, prefix)


class PackWriter:
    """Write an InsightFace-layout pack. Images must arrive grouped by class, classes 0, 1, 2, ...

    Files go to a temporary sibling directory and appear under `directory` only when `close()` succeeds,
    so a failed run leaves nothing half-written. The header record (key 0) is written first with a
    placeholder and patched at the end; its size does not depend on the values.
    """

    def __init__(self, directory: str | os.PathLike, image_size: tuple[int, int] = (112, 112), overwrite: bool = False):
        self.directory = Path(directory)
        if self.directory.exists() and not overwrite and (not self.directory.is_dir() or any(self.directory.iterdir())):
            raise FileExistsError(
                f"output {self.directory} exists and is not empty; pass overwrite (--force) to replace it"
            )
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.image_size = image_size
        self._tmp = make_temp_dir(self.directory)
        try:
            self._writer = RecordWriter(self._tmp / "train.rec", self._tmp / "train.idx")
            self._header_offset = self._writer.write(0, pack_payload([0.0, 0.0], b""))
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._ranges: list[list[int]] = []  # per class [img_start, img_end)
        self._next_key = 1

    def add(self, label: int, image: bytes) -> None:
        label = int(label)
        if label == len(self._ranges):
            self._ranges.append([self._next_key, self._next_key])
        elif label != len(self._ranges) - 1:
            raise ValueError(
                f"PackWriter: label {label} arrived after class {len(self._ranges) - 1}; images must be "
                "grouped by class, with classes numbered 0, 1, 2, ... in order"
            )
        try:
            self._writer.write(self._next_key, pack_payload(float(label), image, id=self._next_key))
        except OSError as err:  # a full disk or a file-size limit: name the output, not the temporary
            raise output_error(err, self._tmp, self.directory)  # noqa: B904  (cause set inside)
        self._next_key += 1
        self._ranges[label][1] = self._next_key

    def close(self) -> Path:
        """Write identity records, patch the header, property; move into place. Returns the directory."""
        if not self._ranges:
            self.abort()
            raise ValueError(f"PackWriter: no images were added; refusing to write an empty pack to {self.directory}")
        try:
            self._finish()
        except BaseException as err:
            self.abort()
            if isinstance(err, OSError):
                raise output_error(err, self._tmp, self.directory)  # noqa: B904  (cause set inside)
            raise
        return self.directory

    def _finish(self) -> None:
        start = self._next_key
        for i, (a, b) in enumerate(self._ranges):
            self._writer.write(start + i, pack_payload([float(a), float(b)], b"", id=start + i))
        end = start + len(self._ranges)
        self._writer.overwrite(self._header_offset, pack_payload([float(start), float(end)], b""))
        self._writer.close()
        h, w = self.image_size
        (self._tmp / "property").write_text(f"{len(self._ranges)},{h},{w}\n")
        move_into_place(self._tmp, self.directory)

    def abort(self) -> None:
        """Discard the partial pack. Its close may fail again (a full disk fails the flush of the buffered
        records too): that error is dropped, the one that made the writer abort is the one to report."""
        try:
            self._writer.close()
        except OSError:
            pass
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "PackWriter":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
