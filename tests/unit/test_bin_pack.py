""".bin verification packs: round trips, InsightFace-style numpy entries, Python-2 era pickles, bad input."""

from __future__ import annotations

import pickle
import pickletools
import struct

import numpy as np
import pytest

from megaface.data import load_bin, save_bin

JPEGISH = [b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2 + bytes([i]) for i in range(6)]


def test_round_trip_bytes(tmp_path):
    save_bin(tmp_path / "v.bin", JPEGISH, [True, False, True])
    images, issame = load_bin(tmp_path / "v.bin")
    assert images == JPEGISH and issame == [True, False, True]
    assert [p.name for p in tmp_path.iterdir()] == ["v.bin"]  # no temporary left behind
    # the file is a plain pickle of (bins, issame_list), readable the way InsightFace reads it
    with open(tmp_path / "v.bin", "rb") as f:
        bins, flags = pickle.load(f, encoding="bytes")
    assert bins == JPEGISH and flags == [True, False, True]


def test_numpy_entries_and_numpy_issame(tmp_path):
    bins = [np.frombuffer(b, dtype=np.uint8) for b in JPEGISH[:4]]
    with open(tmp_path / "np.bin", "wb") as f:
        pickle.dump((bins, np.array([True, False])), f, protocol=pickle.HIGHEST_PROTOCOL)
    images, issame = load_bin(tmp_path / "np.bin")
    assert images == JPEGISH[:4] and issame == [True, False]
    save_bin(tmp_path / "np2.bin", bins, np.array([False, True]))
    assert load_bin(tmp_path / "np2.bin") == (JPEGISH[:4], [False, True])


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """The opcodes Python 2's cPickle (protocol 2) emits for a tuple (list of str, list of bool).

    A py2 `str` is SHORT_BINSTRING/BINSTRING; Python 3 decodes those as text (ASCII by default), which
    fails on JPEG bytes such as 0xff - exactly what happens with the original lfw.bin.
    """
    out = [b"\x80\x02", b"]q\x00(", ]
    memo = 1
    for b in bins:
        op = b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))
        out.append(op + b + b"q" + bytes([memo]))
        memo += 1
    out.append(b"e]q" + bytes([memo]) + b"(")
    out.append(b"".join(b"\x88" if s else b"\x89" for s in issame))
    out.append(b"e\x86q" + bytes([memo + 1]) + b".")
    return b"".join(out)


def test_python2_pickle_fallback(tmp_path):
    data = _py2_pickle(JPEGISH[:4], [False, True])
    pickletools.dis(data, out=open(tmp_path / "dis.txt", "w"))  # a well-formed pickle
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # what a plain Python-3 load does with it
    (tmp_path / "lfw.bin").write_bytes(data)
    images, issame = load_bin(tmp_path / "lfw.bin")
    assert images == JPEGISH[:4] and issame == [False, True]


def test_image_count_mismatch(tmp_path):
    with open(tmp_path / "bad.bin", "wb") as f:
        pickle.dump((JPEGISH[:5], [True, False]), f)
    with pytest.raises(ValueError, match=r"bad\.bin: 5 images for 2 pairs"):
        load_bin(tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="5 images for 2 pairs"):
        save_bin(tmp_path / "out.bin", JPEGISH[:5], [True, False])
    assert not (tmp_path / "out.bin").exists()


def test_not_a_bin(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"junk\.bin: not a readable \.bin"):
        load_bin(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_bin(tmp_path / "missing.bin")
    with open(tmp_path / "odd.bin", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(ValueError, match=r"expected a pickled \(bins, issame_list\)"):
        load_bin(tmp_path / "odd.bin")
