"""OneFlow OFRecord directories (the seed's training and verification data): read, index, encode.

Layout: a directory of part files ``part-<n>``, named unpadded (``part-0``, ``part-1``, ...) or zero-padded
to a suffix length (``part-00000``: the seed's ``--part_name_suffix_length=5``). A part file is a run of
records, each an 8-byte little-endian signed length followed by that many bytes of a serialized
``oneflow.OFRecord`` (proto2, ``oneflow/core/record/record.proto``)::

    message OFRecord { map<string, Feature> feature = 1; }
    message Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                                    DoubleList double_list = 3; Int32List int32_list = 4;
                                    Int64List int64_list = 5; } }      # numeric lists are packed

There is no checksum. Training records carry ``encoded`` (one JPEG) and ``label`` (one int32); verification
records carry ``encoded`` and ``issame`` (image i holds issame[i // 2]). There is no ``property`` file: the
class count is given (``head.num_classes``) or found by one scan of the labels.

Random access comes from a per-part offset index built in one sequential scan of the length prefixes
(8 bytes per record in memory); reads use ``os.pread``, so datasets are safe to share with forked workers.
The message classes are built at run time from a descriptor written here (no protoc, no OneFlow).
"""

from __future__ import annotations

import functools
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

_LENGTH = struct.Struct("<q")
_PART_RE = re.compile(r"^part-(\d+)$")


# ---- messages ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def message_classes() -> dict[str, Any]:
    """``{"OFRecord": cls, "Feature": cls, "BytesList": cls, ...}`` built from a descriptor in a private pool.

    Field names and numbers are OneFlow's, so the bytes are interchangeable with ``record_pb2``.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="megaface_oneflow_record.proto", package="oneflow",
                                             syntax="proto2")
    F = descriptor_pb2.FieldDescriptorProto
    scalar = {"BytesList": F.TYPE_BYTES, "FloatList": F.TYPE_FLOAT, "DoubleList": F.TYPE_DOUBLE,
              "Int32List": F.TYPE_INT32, "Int64List": F.TYPE_INT64}
    for name, kind in scalar.items():
        msg = fdp.message_type.add(name=name)
        field = msg.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=kind)
        if kind != F.TYPE_BYTES:
            field.options.packed = True
    feature = fdp.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (field_name, list_name) in enumerate(
            [("bytes_list", "BytesList"), ("float_list", "FloatList"), ("double_list", "DoubleList"),
             ("int32_list", "Int32List"), ("int64_list", "Int64List")], 1):
        feature.field.add(name=field_name, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                          type_name=f".oneflow.{list_name}", oneof_index=0)
    record = fdp.message_type.add(name="OFRecord")
    entry = record.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".oneflow.Feature")
    record.field.add(name="feature", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE,
                     type_name=".oneflow.OFRecord.FeatureEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    # GetMessageClass arrived in protobuf 4.22; older runtimes (tensorboard allows 3.19+) have GetPrototype
    factory: Any = message_factory.MessageFactory(pool)  # typed Any: current stubs no longer list GetPrototype
    make = getattr(message_factory, "GetMessageClass", None) or factory.GetPrototype
    names = [*scalar, "Feature", "OFRecord"]
    return {n: make(pool.FindMessageTypeByName(f"oneflow.{n}")) for n in names}


def encode_record(features: dict[str, bytes | int | Sequence[int]]) -> bytes:
    """Serialized OFRecord: bytes -> bytes_list [v]; int or list of ints -> int32_list."""
    classes = message_classes()
    record = classes["OFRecord"]()
    for name, value in features.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            record.feature[name].bytes_list.value.append(bytes(value))
        else:
            values = [int(value)] if isinstance(value, (int, np.integer)) else [int(v) for v in value]
            record.feature[name].int32_list.value.extend(values)
    return record.SerializeToString()


def frame(payload: bytes) -> bytes:
    """One record as it sits in a part file: 8-byte little-endian length, then the payload."""
    return _LENGTH.pack(len(payload)) + payload


def decode_record(payload: bytes, where: str) -> Any:
    """Parse an OFRecord; `where` (part file and byte offset) names the record in errors."""
    from google.protobuf.message import DecodeError

    try:
        return message_classes()["OFRecord"].FromString(payload)
    except DecodeError as err:
        raise ValueError(f"{where}: the {len(payload)}-byte record does not parse as a oneflow.OFRecord "
                         f"({err}); the part file is damaged or not an OFRecord file") from None


def bytes_feature(record: Any, name: str, where: str) -> bytes:
    """The first value of bytes feature `name` (e.g. ``encoded``)."""
    feature = _feature(record, name, where)
    if feature.WhichOneof("kind") != "bytes_list" or not feature.bytes_list.value:
        raise ValueError(f"{where}: feature {name!r} is {_kind(feature)}, expected a non-empty bytes_list")
    return feature.bytes_list.value[0]


def int_feature(record: Any, name: str, where: str) -> int:
    """The single value of integer feature `name` (``label``, ``issame``); int32_list or int64_list."""
    feature = _feature(record, name, where)
    kind = feature.WhichOneof("kind")
    values = getattr(feature, kind).value if kind in ("int32_list", "int64_list") else None
    if values is None or len(values) != 1:
        raise ValueError(f"{where}: feature {name!r} is {_kind(feature)}, expected an int32_list of one value")
    return int(values[0])


def _feature(record: Any, name: str, where: str) -> Any:
    if name not in record.feature:
        raise ValueError(f"{where}: record has no {name!r} feature (it holds {sorted(record.feature) or 'none'}); "
                         "training parts need 'encoded' + 'label', verification parts 'encoded' + 'issame'")
    return record.feature[name]


def _kind(feature: Any) -> str:
    kind = feature.WhichOneof("kind")
    return f"{kind} of {len(getattr(feature, kind).value)} value(s)" if kind else "empty"


# ---- part files --------------------------------------------------------------------------------------

def part_name(index: int, suffix_length: int | None) -> str:
    """``part-<index>``, zero-padded to `suffix_length` digits (None or 1: unpadded)."""
    return f"part-{index:0{suffix_length or 1}d}"


def find_parts(directory: str | os.PathLike, part_num: int | None = None,
               suffix_length: int | None = None) -> list[Path]:
    """Part files of `directory` in order: ``part-0 .. part-{part_num - 1}``.

    Without `suffix_length` the padding is read off the names (all padded to one width, or unpadded);
    without `part_num` every part is taken and the numbers must run 0, 1, 2, ... with no gap. With
    `part_num`, parts from `part_num` on are left out (the seed reads the first ``--train_data_part_num``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"OFRecord directory not found: {directory}")
    if part_num is not None and part_num < 1:
        raise ValueError(f"part_num={part_num} must be >= 1 (or unset to take every part file)")
    if suffix_length is not None and suffix_length < 1:
        raise ValueError(f"part_name_suffix_length={suffix_length} must be >= 1 (or unset to detect it)")
    names = {p.name: int(m.group(1)) for p in directory.iterdir() if (m := _PART_RE.match(p.name)) and p.is_file()}
    if not names:
        hint = (f"; it has a train/ sub-folder (the seed's converter writes DIR/train/part-*): point at "
                f"{directory / 'train'}" if (directory / "train").is_dir() else "")
        raise FileNotFoundError(f"{directory}: no part files (expected part-0, part-1, ... or part-00000, ...){hint}")
    if suffix_length is None:
        suffix_length = _detect_suffix_length(directory, names)
    count = part_num if part_num is not None else len(names)
    paths = [directory / part_name(i, suffix_length) for i in range(count)]
    missing = [p.name for p in paths if p.name not in names]
    if missing:
        found = ", ".join(sorted(names, key=lambda name: names[name])[:5])
        fix = ("lower data.part_num" if part_num is not None else "the part numbers must run 0, 1, 2, ... without gaps")
        raise FileNotFoundError(f"{directory}: part file {missing[0]} is missing ({len(missing)} of {count} expected "
                                f"with suffix length {suffix_length}; found {found}, ...); {fix} or set "
                                "data.part_name_suffix_length to match the names")
    return paths


def _detect_suffix_length(directory: Path, names: dict[str, int]) -> int:
    digits = [name[len("part-"):] for name in names]
    padded = {len(d) for d in digits if len(d) > 1 and d.startswith("0")}
    if not padded:
        return 1
    widths = {len(d) for d in digits}
    if len(padded) > 1 or widths != padded:
        raise ValueError(f"{directory}: part file names mix paddings (digit counts {sorted(widths)}); "
                         "set data.part_name_suffix_length (part_name_suffix_length) to say which ones to read")
    return padded.pop()


def scan_part(path: Path, with_labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One sequential pass -> (byte offset of every record's length prefix int64 [n], labels int64 [n] or None).

    Without labels only the 8-byte prefixes are read (one pread each: 1.4x the records/s of a buffered
    read + seek, which refills its buffer at every record).
    """
    offsets: list[int] = []
    labels: list[int] | None = [] if with_labels else None
    fd = os.open(path, os.O_RDONLY)
    try:
        size, offset = os.fstat(fd).st_size, 0
        while offset < size:
            head = os.pread(fd, 8, offset)
            if len(head) < 8:
                raise ValueError(f"{path}: byte offset {offset}: {len(head)} trailing bytes, too few for an 8-byte "
                                 f"record length (file is {size} bytes); the part file is truncated")
            (length,) = _LENGTH.unpack(head)
            if length < 0 or length > size - offset - 8:
                raise ValueError(f"{path}: byte offset {offset}: record length {length} runs past the end of the "
                                 f"file ({size} bytes, {size - offset - 8} left); the part file is truncated "
                                 "or not an OFRecord file")
            if labels is not None:
                where = f"{path}: record {len(offsets)} at byte offset {offset}"
                labels.append(int_feature(decode_record(os.pread(fd, length, offset + 8), where), "label", where))
            offsets.append(offset)
            offset += 8 + length
    finally:
        os.close(fd)
    return np.asarray(offsets, dtype=np.int64), (None if labels is None else np.asarray(labels, dtype=np.int64))


class _Parts:
    """Records of several part files addressed by one global index (the concatenation in part order)."""

    def __init__(self, paths: list[Path], offsets: list[np.ndarray]):
        self.paths = paths
        self.sizes = [p.stat().st_size for p in paths]
        self.starts = np.cumsum([0] + [o.size for o in offsets]).astype(np.int64)
        # payload length = next prefix - this prefix - 8, with the file size closing the last record
        # (an empty part, which the seed's converter can leave at the end, contributes nothing)
        ends = [np.append(o[1:], size) if o.size else o for o, size in zip(offsets, self.sizes, strict=False)]
        self.offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self.lengths = (np.concatenate(ends) - self.offsets - 8) if offsets else np.zeros(0, np.int64)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (part number, index within the part)."""
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return part, i - int(self.starts[part])

    def where(self, i: int) -> str:
        part, j = self.locate(i)
        return f"{self.paths[part]}: record {j} at byte offset {int(self.offsets[i])}"

    def read(self, i: int) -> Any:
        part, _ = self.locate(i)
        fd = self._fds.get(part)
        if fd is None:
            fd = self._fds[part] = os.open(self.paths[part], os.O_RDONLY)
        length = int(self.lengths[i])
        payload = os.pread(fd, length, int(self.offsets[i]) + 8)
        if len(payload) < length:
            raise ValueError(f"{self.where(i)}: {len(payload)} of {length} bytes readable; the part file shrank "
                             "after it was indexed")
        return decode_record(payload, self.where(i))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        # a pickled copy (spawned workers) opens its own descriptors
        return {**self.__dict__, "_fds": {}}


def _scan_all(paths: list[Path], with_labels: bool, share: tuple[int, int],
              gather: Callable[[Any], list[Any]] | None) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Scan every part; with a `gather` (all-gather of Python objects), rank r scans parts r, r+W, ..."""
    rank, world = share
    mine = {i: scan_part(paths[i], with_labels) for i in range(rank, len(paths), world)}
    if gather is None or world == 1:
        return [mine[i] if i in mine else scan_part(paths[i], with_labels) for i in range(len(paths))]
    merged: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for part in gather(mine):
        merged.update(part)
    return [merged[i] for i in range(len(paths))]


class OFRecordDataset:
    """Training records of an OFRecord directory: ``ds[i] -> (label, JPEG bytes)``, parts in order.

    `num_classes`: the class count (``head.num_classes``); None scans every label once and takes max + 1.
    A label outside ``[0, num_classes)`` is an error naming the part file and byte offset.
    `share` / `gather`: (rank, world size) and an all-gather of Python objects, so that each rank scans
    only its share of the parts; without them one process scans everything.
    """

    def __init__(self, directory: str | os.PathLike, num_classes: int | None = None, part_num: int | None = None,
                 part_name_suffix_length: int | None = None, share: tuple[int, int] = (0, 1),
                 gather: Callable[[Any], list[Any]] | None = None):
        self.directory = Path(directory)
        paths = find_parts(self.directory, part_num, part_name_suffix_length)
        scans = _scan_all(paths, num_classes is None, share, gather)
        self._parts = _Parts(paths, [offsets for offsets, _ in scans])
        if len(self._parts) == 0:
            raise ValueError(f"{self.directory}: the {len(paths)} part file(s) hold no records")
        self.image_size = None  # not known without decoding
        if num_classes is None:
            labels = np.concatenate([lab for _, lab in scans])
            bad = np.flatnonzero(labels < 0)
            if bad.size:
                raise ValueError(f"{self._parts.where(int(bad[0]))}: label {int(labels[bad[0]])} is negative; "
                                 "labels must be class numbers 0, 1, 2, ...")
            self._labels: np.ndarray | None = labels
            self.num_classes = int(labels.max()) + 1
        else:
            if num_classes < 1:
                raise ValueError(f"num_classes={num_classes} must be >= 1")
            self._labels, self.num_classes = None, int(num_classes)

    @property
    def part_paths(self) -> list[Path]:
        return list(self._parts.paths)

    def __len__(self) -> int:
        return len(self._parts)

    def __getitem__(self, i: int) -> tuple[int, bytes]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"OFRecord index {i} out of range for {n} records")
        i %= n
        where = self._parts.where(i)
        record = self._parts.read(i)
        label = int_feature(record, "label", where)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{where}: label {label} is outside [0, {self.num_classes}) (the class count from "
                             "head.num_classes or the label scan); fix head.num_classes or the data")
        return label, bytes_feature(record, "encoded", where)

    def where(self, i: int) -> str:
        return self._parts.where(i)

    def labels(self) -> np.ndarray:
        """All labels (from the scan when there was one; otherwise every record is read)."""
        if self._labels is not None:
            return self._labels.copy()
        return np.array([self[i][0] for i in range(len(self))], dtype=np.int64)

    def close(self) -> None:
        self._parts.close()


def is_ofrecord_dir(path: str | os.PathLike) -> bool:
    """A directory holding at least one ``part-<n>`` file."""
    path = Path(path)
    return path.is_dir() and any(_PART_RE.match(p.name) for p in path.iterdir())


def load_verification(directory: str | os.PathLike, part_num: int | None = None,
                      part_name_suffix_length: int | None = None) -> tuple[list[bytes], list[bool]]:
    """An OFRecord verification set -> (images in pair order a0, b0, a1, ..., issame per pair)."""
    paths = find_parts(directory, part_num, part_name_suffix_length)
    parts = _Parts(paths, [scan_part(p)[0] for p in paths])
    images, flags = [], []
    try:
        for i in range(len(parts)):
            where = parts.where(i)
            record = parts.read(i)
            images.append(bytes_feature(record, "encoded", where))
            flags.append(int_feature(record, "issame", where))
            if i % 2 and flags[-1] != flags[-2]:
                raise ValueError(f"{where}: issame {flags[-1]} differs from the {flags[-2]} of the pair's first "
                                 "image; image i must hold issame[i // 2]")
    finally:
        parts.close()
    if len(images) % 2:
        raise ValueError(f"{directory}: {len(images)} records, an odd count; a verification set holds 2 images "
                         "per pair (a0, b0, a1, b1, ...)")
    return images, [bool(v) for v in flags[::2]]
