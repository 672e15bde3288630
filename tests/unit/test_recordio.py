"""RecordIO byte format, InsightFace pack layout, and bad-input errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from megaface.data import open_pack
from megaface.data.packs import PackWriter
from megaface.data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    RecordReader,
    RecordWriter,
    encode_record,
    pack_payload,
    read_index,
    unpack_payload,
    write_index,
)

M = struct.pack("<I", 0xCED7230A)


def phys(cflag: int, data: bytes) -> bytes:
    """A physical record built by hand from the format description."""
    return M + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def test_magic_constant():
    assert MAGIC_BYTES == bytes.fromhex("0a23d7ce") and MAGIC == 0xCED7230A


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"", phys(0, b"")),
        (b"abcde", phys(0, b"abcde")),
        (b"abcd" + M + b"efgh12", phys(1, b"abcd") + phys(3, b"efgh12")),
        (M + b"xy", phys(1, b"") + phys(3, b"xy")),
        (b"abcd" + M, phys(1, b"abcd") + phys(3, b"")),
        (b"ab" + M + b"cd", phys(0, b"ab" + M + b"cd")),  # magic not 4-aligned: kept
        (b"abcd" + M + b"efgh" + M + b"z", phys(1, b"abcd") + phys(2, b"efgh") + phys(3, b"z")),
        (b"abcd" + M[:3], phys(0, b"abcd" + M[:3])),  # partial magic at the tail
    ],
)
def test_writer_bytes(payload, expected):
    assert encode_record(payload) == expected


def test_magic_in_unaligned_tail_is_not_split():
    # dmlc-core only scans up to the last full 4-byte word; a magic at offset 4 of a 9-byte payload is aligned
    payload = b"abcd" + M + b"q"
    assert encode_record(payload) == phys(1, b"abcd") + phys(3, b"q")


def test_reader_hand_built_multipart(tmp_path):
    body = b"\x00" * 24 + b"JPEGDATA"
    rec = phys(0, b"hello") + phys(1, b"abcd") + phys(2, b"") + phys(2, b"ef") + phys(3, b"gh!") + phys(0, body)
    (tmp_path / "x.rec").write_bytes(rec)
    r = RecordReader(tmp_path / "x.rec")
    assert r.read_at(0) == b"hello"
    assert r.read_at(16) == b"abcd" + M + M + b"ef" + M + b"gh!"
    assert r.read_at(len(rec) - 8 - len(body)) == body


def test_round_trip_random_payloads(tmp_path):
    rng = np.random.default_rng(0)
    payloads = []
    for n in range(40):
        words = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype("<u4")
        words[rng.random(n) < 0.3] = MAGIC  # plenty of aligned magics
        payloads.append(words.tobytes() + bytes(rng.integers(0, 256, n % 4, dtype=np.uint8)))
    with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    keys, offsets = read_index(tmp_path / "a.idx")
    r = RecordReader(tmp_path / "a.rec")
    assert keys.tolist() == list(range(40))
    assert [r.read_at(int(o)) for o in offsets] == payloads


def test_payload_header_scalar_and_array():
    p = pack_payload(7, b"\xff\xd8img", id=5)
    assert p[:24] == struct.pack("<IfQQ", 0, 7.0, 5, 0) and p[24:] == b"\xff\xd8img"
    p = pack_payload([3.0, 9.5], b"IMG")
    assert p == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", 3.0, 9.5) + b"IMG"
    header, image = unpack_payload(p)
    assert header.flag == 2 and header.labels.tolist() == [3.0, 9.5] and header.class_label == 3.0
    assert image == b"IMG"
    with pytest.raises(ValueError, match="shorter than the 24-byte"):
        unpack_payload(b"abc", "x.rec: key 4")


def _write_header_pack(d, per_class=(2, 3, 1), array_labels=False):
    """An InsightFace-layout pack written record by record, independently of PackWriter."""
    d.mkdir(parents=True, exist_ok=True)
    n = sum(per_class)
    start, end = n + 1, n + 1 + len(per_class)
    images, key = {}, 1
    with RecordWriter(d / "train.rec", d / "train.idx") as w:
        w.write(0, pack_payload([float(start), float(end)], b""))
        for c, count in enumerate(per_class):
            for _ in range(count):
                img = b"\xff\xd8" + bytes([c, key]) + M * (key % 3)
                w.write(key, pack_payload([float(c), 0.5] if array_labels else c, img, id=key))
                images[key] = (c, img)
                key += 1
        first = 1
        for c, count in enumerate(per_class):
            w.write(start + c, pack_payload([float(first), float(first + count)], b""))
            first += count
    (d / "property").write_text(f"{len(per_class)},112,112\n")
    return images


@pytest.mark.parametrize("array_labels", [False, True])
def test_header_pack(tmp_path, array_labels):
    images = _write_header_pack(tmp_path / "p", array_labels=array_labels)
    pack = open_pack(tmp_path / "p")
    assert pack.has_header and pack.identity_range == (7, 10)
    assert len(pack) == 6 and pack.num_classes == 3 and pack.image_size == (112, 112)
    assert [pack[i] for i in range(len(pack))] == [images[k] for k in range(1, 7)]
    assert pack.labels().tolist() == [0, 0, 1, 1, 1, 2]


def test_headerless_pack_in_idx_order(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    order = [5, 0, 3, 1]
    w = RecordWriter(d / "train.rec")
    for k in sorted(order):
        w.write(k, pack_payload(k % 2, bytes([k]) * 5))
    w.close()
    by_key = dict(w.index)
    write_index(d / "train.idx", [(k, by_key[k]) for k in order])
    (d / "property").write_text("2,112,112")
    pack = open_pack(d)
    assert not pack.has_header and len(pack) == 4
    assert [pack[i] for i in range(4)] == [(k % 2, bytes([k]) * 5) for k in order]


def test_pack_writer_layout(tmp_path):
    with PackWriter(tmp_path / "out") as w:
        for c, k in [(0, 1), (0, 2), (1, 3)]:
            w.add(c, b"img%d" % k + M)
    keys, offsets = read_index(tmp_path / "out" / "train.idx")
    assert keys.tolist() == [0, 1, 2, 3, 4, 5]
    r = RecordReader(tmp_path / "out" / "train.rec")
    recs = [unpack_payload(r.read_at(int(o))) for o in offsets]
    assert recs[0][0].labels.tolist() == [4.0, 6.0] and recs[0][1] == b""
    expected = [(0.0, 1, b"img1" + M), (0.0, 2, b"img2" + M), (1.0, 3, b"img3" + M)]
    assert [(h.label, h.id, img) for h, img in recs[1:4]] == expected
    assert [h.labels.tolist() for h, _ in recs[4:]] == [[1.0, 3.0], [3.0, 4.0]]
    assert (tmp_path / "out" / "property").read_text() == "2,112,112\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pack_writer_rejects_unordered_labels(tmp_path):
    with pytest.raises(ValueError, match="grouped by class"):
        with PackWriter(tmp_path / "out") as w:
            w.add(0, b"a")
            w.add(2, b"b")
    assert list(tmp_path.iterdir()) == []  # nothing partially written


def test_offsets_past_4gib_sparse(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    offset = 2**32 + 4096
    payload = pack_payload(1, b"\xff\xd8far" + M + b"away")
    with open(d / "train.rec", "wb") as f:
        f.write(encode_record(pack_payload(0, b"near")))
        f.seek(offset)  # a hole: the file is sparse, nothing is really written in between
        f.write(encode_record(payload))
    write_index(d / "train.idx", [(0, 0), (1, offset)])
    (d / "property").write_text("2,112,112")
    pack = open_pack(d)
    assert pack.offsets.dtype == np.int64 and int(pack.offsets[1]) == offset
    assert pack[1] == (1, b"\xff\xd8far" + M + b"away") and pack[0] == (0, b"near")


def test_float32_header_above_2_pow_24(tmp_path):
    # Identity boundary at key 2^24 + 3 is stored as float32 2^24 + 4: the reader must find the real boundary.
    d = tmp_path / "g"
    d.mkdir()
    big = 2**24
    img_keys = [1, 2, big + 1, big + 2]
    start = big + 3
    with RecordWriter(d / "train.rec", d / "train.idx") as w:
        w.write(0, pack_payload([float(start), float(start + 2)], b""))
        for i, k in enumerate(img_keys):
            w.write(k, pack_payload(i // 2, b"im%d" % k))
        w.write(start, pack_payload([1.0, 3.0], b""))
        w.write(start + 1, pack_payload([3.0, big + 3.0], b""))
    assert float(np.float32(start)) != start
    (d / "property").write_text("2,112,112")
    pack = open_pack(d)
    assert pack.identity_range[0] == start
    assert pack.keys.tolist() == img_keys and [pack[i][0] for i in range(4)] == [0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_idx_and_property(tmp_path):
    _write_header_pack(tmp_path / "p")
    (tmp_path / "p" / "property").unlink()
    with pytest.raises(FileNotFoundError, match=r"property"):
        open_pack(tmp_path / "p")
    _write_header_pack(tmp_path / "q")
    (tmp_path / "q" / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.idx"):
        open_pack(tmp_path / "q")


def test_bad_magic_names_file_key_offset(tmp_path):
    _write_header_pack(tmp_path / "p")
    keys, offsets = read_index(tmp_path / "p" / "train.idx")
    write_index(tmp_path / "p" / "train.idx", [(int(k), int(o) + (4 if k == 2 else 0)) for k, o in zip(keys, offsets, strict=False)])
    pack = open_pack(tmp_path / "p")
    with pytest.raises(ValueError, match=rf"train\.rec: record key 2 at offset {int(offsets[2]) + 4}: bad magic"):
        pack[1]


def test_offset_past_eof(tmp_path):
    _write_header_pack(tmp_path / "p")
    size = (tmp_path / "p" / "train.rec").stat().st_size
    keys, offsets = read_index(tmp_path / "p" / "train.idx")
    moved = [(int(k), int(o) if k != 3 else size + 100) for k, o in zip(keys, offsets, strict=False)]
    write_index(tmp_path / "p" / "train.idx", moved)
    with pytest.raises(ValueError, match=rf"train\.idx: key 3 points at offset {size + 100}, past the end"):
        open_pack(tmp_path / "p")


def test_truncated_record(tmp_path):
    _write_header_pack(tmp_path / "p", per_class=(1, 1))
    rec = tmp_path / "p" / "train.rec"
    keys, offsets = read_index(tmp_path / "p" / "train.idx")
    last_image_offset = int(offsets[2])
    rec.write_bytes(rec.read_bytes()[: last_image_offset + 12])
    keys, offsets = keys[:3], offsets[:3]
    write_index(tmp_path / "p" / "train.idx", list(zip(keys.tolist(), offsets.tolist(), strict=False)))
    pack = open_pack(tmp_path / "p")
    assert pack[0][0] == 0
    with pytest.raises(ValueError, match=rf"key 2 at offset {last_image_offset}: truncated record"):
        pack[1]


def test_label_out_of_range(tmp_path):
    _write_header_pack(tmp_path / "p")
    (tmp_path / "p" / "property").write_text("2,112,112")  # header says 3 identities
    with pytest.raises(ValueError, match="lists 3 identities.*says 2 classes"):
        open_pack(tmp_path / "p")
    d = tmp_path / "h"
    d.mkdir()
    with RecordWriter(d / "train.rec", d / "train.idx") as w:
        w.write(0, pack_payload(0, b"a"))
        w.write(1, pack_payload(5, b"b"))
    (d / "property").write_text("3,112,112")
    pack = open_pack(d)
    with pytest.raises(ValueError, match=r"train\.rec: key 1 \(offset \d+\) has label 5, outside \[0, 3\)"):
        pack[1]


def test_bad_property_and_bad_index(tmp_path):
    _write_header_pack(tmp_path / "p")
    (tmp_path / "p" / "property").write_text("lots")
    with pytest.raises(ValueError, match="num_classes,height,width"):
        open_pack(tmp_path / "p")
    (tmp_path / "p" / "property").write_text("3,112,112")
    (tmp_path / "p" / "train.idx").write_text("0\t0\n1\n")
    with pytest.raises(ValueError, match=r"train\.idx:2: expected 'key<TAB>offset'"):
        open_pack(tmp_path / "p")
    (tmp_path / "p" / "train.idx").write_text("0\t0\n1\t4x\n")
    with pytest.raises(ValueError, match=r"train\.idx:2: expected"):
        open_pack(tmp_path / "p")
    (tmp_path / "p" / "train.idx").write_text("")
    with pytest.raises(ValueError, match=r"train\.idx: the index is empty"):
        open_pack(tmp_path / "p")
