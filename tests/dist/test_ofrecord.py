"""OFRecord part directories: the reader against hand-encoded bytes, the writer against a hand decoder,
part discovery, the offset index shared over ranks, exact resume, verification sets and bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from megaface.data import TrainLoader, encode_jpeg, load_bin, open_pack, save_bin
from megaface.data.ofrecord import OFRecordDataset, encode_record, find_parts, load_verification
from megaface.data.ofrecord_pack import write_parts
from megaface.eval.validation import read_bin

# ---- protobuf wire format written by hand (independent of megaface's descriptor) ------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are sign-extended to 10 bytes
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _feature(value: bytes | int) -> bytes:
    if isinstance(value, bytes):  # Feature.bytes_list (1) -> BytesList.value (1)
        return _len_field(1, _len_field(1, value))
    # Feature.int32_list (4) -> Int32List.value (1), packed
    return _len_field(4, _len_field(1, _varint(value)))


def hand_record(features: list[tuple[str, bytes | int]]) -> bytes:
    """OFRecord bytes: one map entry (field 1) per feature, in the given order."""
    return b"".join(_len_field(1, _len_field(1, k.encode()) + _len_field(2, _feature(v))) for k, v in features)


def hand_part(records: list[bytes]) -> bytes:
    return b"".join(struct.pack("<q", len(r)) + r for r in records)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        assert key & 7 == 2, "only length-delimited fields are expected here"
        n, pos = _read_varint(data, pos)
        out.append((key >> 3, data[pos:pos + n]))
        pos += n
    return out


def hand_decode(record: bytes) -> dict[str, bytes | int]:
    """Inverse of `hand_record` for bytes_list / int32_list features of one value."""
    result = {}
    for number, entry in _fields(record):
        assert number == 1
        parts = dict(_fields(entry))
        (kind, body), = _fields(parts[2])
        (_, value), = _fields(body)
        result[parts[1].decode()] = value if kind == 1 else _read_varint(value, 0)[0]
    return result


def _jpeg(seed: int, size: int = 16) -> bytes:
    return encode_jpeg(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def hand_dir(tmp_path: Path) -> tuple[Path, list[tuple[int, bytes]]]:
    """part-0 (3 records) and part-1 (2 records), unpadded names, feature order varying per record."""
    items = [(i % 3, _jpeg(i)) for i in range(5)]
    records = [hand_record([("encoded", img), ("label", lab)] if i % 2 else [("label", lab), ("encoded", img)])
               for i, (lab, img) in enumerate(items)]
    d = tmp_path / "hand"
    d.mkdir()
    (d / "part-0").write_bytes(hand_part(records[:3]))
    (d / "part-1").write_bytes(hand_part(records[3:]))
    return d, items


# ---- reading and writing -------------------------------------------------------------------------------

def test_reads_hand_encoded_parts(hand_dir):
    d, items = hand_dir
    ds = open_pack(d)  # no train.rec: the OFRecord reader, class count from one label scan
    assert isinstance(ds, OFRecordDataset)
    assert len(ds) == 5 and ds.num_classes == 3 and [ds[i] for i in range(5)] == items
    assert ds[-1] == items[-1] and list(ds.labels()) == [lab for lab, _ in items]
    first = len(hand_record([("label", 0), ("encoded", items[0][1])])) + 8
    assert ds.where(1) == f"{d / 'part-0'}: record 1 at byte offset {first}"
    assert ds.where(3) == f"{d / 'part-1'}: record 0 at byte offset 0"
    with pytest.raises(IndexError):
        ds[5]
    # a given class count skips the label scan and bounds the labels
    assert OFRecordDataset(d, num_classes=10).num_classes == 10


def test_empty_parts_are_skipped(hand_dir):
    d, items = hand_dir
    (d / "part-1").rename(d / "part-2")
    (d / "part-1").write_bytes(b"")  # the seed's converter rounds the part size up: trailing parts may be empty
    (d / "part-3").write_bytes(b"")
    ds = OFRecordDataset(d)
    assert len(ds) == 5 and [ds[i] for i in range(5)] == items
    assert ds.where(3) == f"{d / 'part-2'}: record 0 at byte offset 0"


def test_writer_output_decodes_by_hand(tmp_path):
    items = [(7, _jpeg(0)), (0, _jpeg(1)), (2**31 - 1, _jpeg(2))]
    records = iter([encode_record({"encoded": img, "label": lab}) for lab, img in items])
    paths = write_parts(tmp_path / "w", 3, records, parts=2)
    assert [p.name for p in paths] == ["part-00000", "part-00001"]
    decoded = []
    for p in paths:
        data, pos = p.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack_from("<q", data, pos)
            decoded.append(hand_decode(data[pos + 8:pos + 8 + n]))
            pos += 8 + n
    assert decoded == [{"encoded": img, "label": lab} for lab, img in items]
    assert [OFRecordDataset(tmp_path / "w")[i] for i in range(3)] == items


def test_part_discovery(tmp_path):
    d = tmp_path / "p"
    write_parts(d, 4, iter([encode_record({"encoded": b"x", "label": 0})] * 4), parts=4, suffix_length=5)
    assert [p.name for p in find_parts(d)] == ["part-00000", "part-00001", "part-00002", "part-00003"]
    assert [p.name for p in find_parts(d, part_num=2)] == ["part-00000", "part-00001"]  # the seed's part_num
    assert len(find_parts(d, suffix_length=5)) == 4
    with pytest.raises(FileNotFoundError, match="part file part-00004 is missing"):
        find_parts(d, part_num=5)
    with pytest.raises(FileNotFoundError, match="part-0 is missing"):
        find_parts(d, suffix_length=1)
    (d / "part-00002").unlink()
    with pytest.raises(FileNotFoundError, match="part-00002 is missing.*without gaps"):
        find_parts(d)
    (d / "part-7").write_bytes(b"")
    with pytest.raises(ValueError, match="mix paddings"):
        find_parts(d)
    with pytest.raises(FileNotFoundError, match="no part files.*point at .*train"):
        (tmp_path / "seedout" / "train").mkdir(parents=True)
        find_parts(tmp_path / "seedout")


def test_index_scan_is_shared_over_ranks(hand_dir, monkeypatch):
    from megaface.data import ofrecord

    d, items = hand_dir
    scanned: list[str] = []
    original = ofrecord.scan_part
    monkeypatch.setattr(ofrecord, "scan_part", lambda p, labels=False: scanned.append(p.name) or original(p, labels))
    shares = {r: {i: original(p, True) for i, p in enumerate(find_parts(d)) if i % 2 == r} for r in (0, 1)}
    ds = OFRecordDataset(d, share=(1, 2), gather=lambda mine: [shares[0], mine])
    assert scanned == ["part-1"]  # rank 1 of 2 scanned only its part, the rest came from the gather
    assert [ds[i] for i in range(5)] == items and ds.num_classes == 3


def _shared_scan_worker(state, directory: Path) -> list:
    from megaface.distributed import comm

    ds = OFRecordDataset(directory, share=(state.rank, state.world_size),
                         gather=lambda obj: comm.all_gather_object(obj, state.group))
    return [ds.num_classes, ds._parts.offsets.tolist(), [ds[i] for i in range(len(ds))]]


def test_shared_scan_on_two_gloo_ranks(hand_dir):
    from tests.conftest import run_distributed

    d, items = hand_dir
    reference = OFRecordDataset(d)
    results = run_distributed(_shared_scan_worker, 2, d)
    assert results[0] == results[1] == [3, reference._parts.offsets.tolist(), items]


def test_train_loader_resume_is_exact(hand_dir):
    d, _ = hand_dir
    full = TrainLoader(OFRecordDataset(d), 2, workers=0, seed=3)
    batches = [labels.tolist() for _, labels in full]
    with_worker = TrainLoader(OFRecordDataset(d), 2, workers=1, seed=3)  # forked worker reads by pread
    assert [labels.tolist() for _, labels in with_worker] == batches
    with_worker.close()
    first = TrainLoader(OFRecordDataset(d), 2, workers=0, seed=3)
    it = iter(first)
    next(it)
    state = first.state_dict()
    resumed = TrainLoader(OFRecordDataset(d), 2, workers=0, seed=3)
    resumed.load_state_dict(state)
    assert [labels.tolist() for _, labels in resumed] == batches[1:]


def test_verification_round_trip_keeps_pair_order(tmp_path):
    images = [_jpeg(i) for i in range(10)]
    issame = [True, False, False, True, True]
    save_bin(tmp_path / "lfw.bin", images, issame)
    from megaface.data.cli import main

    assert main(["ofrecord", "--input", str(tmp_path / "lfw.bin"), "--output", str(tmp_path / "lfw"),
                 "--parts", "3"]) == 0
    assert read_bin(tmp_path / "lfw") == (images, issame) == load_bin(tmp_path / "lfw.bin")
    # hand-written set, unpadded names, issame as the seed stores it (image i holds issame[i // 2])
    d = tmp_path / "agedb"
    d.mkdir()
    (d / "part-0").write_bytes(hand_part([hand_record([("issame", int(issame[i // 2])), ("encoded", images[i])])
                                          for i in range(10)]))
    assert load_verification(d) == (images, issame)


# ---- bad input -----------------------------------------------------------------------------------------

def _one_part(tmp_path: Path, data: bytes) -> Path:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / "part-0").write_bytes(data)
    return d


def test_length_past_the_end(tmp_path):
    good = hand_record([("encoded", b"jpg"), ("label", 0)])
    d = _one_part(tmp_path, hand_part([good]) + struct.pack("<q", 1000) + b"short")
    with pytest.raises(ValueError, match=rf"part-0: byte offset {len(good) + 8}: record length 1000 runs past"):
        OFRecordDataset(d, num_classes=1)
    _one_part(tmp_path, hand_part([good]) + b"\x01\x02")
    with pytest.raises(ValueError, match=rf"part-0: byte offset {len(good) + 8}: 2 trailing bytes"):
        OFRecordDataset(d, num_classes=1)
    _one_part(tmp_path, struct.pack("<q", -5) + good)
    with pytest.raises(ValueError, match="byte offset 0: record length -5"):
        OFRecordDataset(d, num_classes=1)


def test_record_that_does_not_parse(tmp_path):
    d = _one_part(tmp_path, hand_part([b"\x0a\xff\xff\xff\x0f\x00"]))  # a map entry longer than the record
    with pytest.raises(ValueError, match="part-0: record 0 at byte offset 0: the 6-byte record does not parse"):
        OFRecordDataset(d)  # found by the label scan
    ds = OFRecordDataset(d, num_classes=1)  # found on read when the scan only reads lengths
    with pytest.raises(ValueError, match="record 0 at byte offset 0: the 6-byte record does not parse"):
        ds[0]


@pytest.mark.parametrize("features, missing", [([("label", 0)], "encoded"), ([("encoded", b"j")], "label")])
def test_missing_training_feature(tmp_path, features, missing):
    d = _one_part(tmp_path, hand_part([hand_record([("encoded", b"j"), ("label", 0)]), hand_record(features)]))
    offset = len(hand_record([("encoded", b"j"), ("label", 0)])) + 8
    with pytest.raises(ValueError, match=rf"part-0: record 1 at byte offset {offset}: record has no '{missing}'"):
        OFRecordDataset(d, num_classes=2)[1]


def test_missing_issame_and_bad_pairs(tmp_path):
    d = _one_part(tmp_path, hand_part([hand_record([("encoded", b"j"), ("issame", 1)]),
                                       hand_record([("encoded", b"j")])]))
    with pytest.raises(ValueError, match="record 1 at byte offset .*no 'issame'"):
        read_bin(d)
    _one_part(tmp_path, hand_part([hand_record([("encoded", b"j"), ("issame", 1)]),
                                   hand_record([("encoded", b"j"), ("issame", 0)])]))
    with pytest.raises(ValueError, match="record 1 .*issame 0 differs"):
        read_bin(d)
    _one_part(tmp_path, hand_part([hand_record([("encoded", b"j"), ("issame", 1)])]))
    with pytest.raises(ValueError, match="odd count"):
        read_bin(d)


def test_label_outside_the_class_count(tmp_path):
    d = _one_part(tmp_path, hand_part([hand_record([("encoded", b"j"), ("label", 1)]),
                                       hand_record([("encoded", b"j"), ("label", 5)])]))
    offset = len(hand_record([("encoded", b"j"), ("label", 1)])) + 8
    ds = OFRecordDataset(d, num_classes=5)
    assert ds[0] == (1, b"j")
    with pytest.raises(ValueError, match=rf"record 1 at byte offset {offset}: label 5 is outside \[0, 5\)"):
        ds[1]
    _one_part(tmp_path, hand_part([hand_record([("encoded", b"j"), ("label", -1)])]))
    with pytest.raises(ValueError, match="byte offset 0: label -1 is negative"):
        OFRecordDataset(d)


def test_forced_replacement_keeps_the_old_output_when_it_fails(tmp_path):
    record = encode_record({"encoded": b"x", "label": 0})
    out = tmp_path / "of"
    old = write_parts(out, 4, iter([record] * 4), parts=4)
    before = {p.name: p.read_bytes() for p in old}
    with pytest.raises(FileExistsError, match="pass --force to replace it"):
        write_parts(out, 2, iter([record] * 2), parts=2)
    with pytest.raises(ValueError, match="the source ran out after 2 of 5 records"):
        write_parts(out, 5, iter([record] * 2), parts=2, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["of"]  # no staging or old copies left
    new = write_parts(out, 2, iter([record] * 2), parts=2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in new)  # old parts 2 and 3 are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["of"]
