"""Damaged data is counted, not decoded silently (issue 20, item 9).

A JPEG whose entropy data is damaged decodes with libjpeg warnings (the rest of the image grey); the loader
counts such records and logs where they are, `data.strict_decode: true` makes them errors, and embed warns
with their positions. A pack whose property declares more classes than its labels use gets a warning naming
both counts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from megaface.config import load_config
from megaface.data import CorruptImageError, PackWriter, TrainLoader, decode_image, encode_jpeg, open_pack
from megaface.data.decode import decode_image_checked
from megaface.eval.embed import decode_images
from tests.support.fault_fixtures import raw_pack

DAMAGED = (2, 5)


def damage_entropy(jpeg: bytes) -> bytes:
    """Overwrite 40 bytes in the middle of the scan: libjpeg warns, decodes, and greys the rest."""
    data = bytearray(jpeg)
    for k in range(len(data) // 2, len(data) // 2 + 40):
        data[k] = 0xFF if k % 7 == 0 else data[k] ^ 0x55
    return bytes(data)


def _pack(path: Path) -> Path:
    rng = np.random.default_rng(0)
    with PackWriter(path) as writer:
        for k in range(8):
            data = encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
            writer.add(k // 4, damage_entropy(data) if k in DAMAGED else data)
    return path


def test_damaged_jpeg_decodes_with_a_warning_and_strict_refuses() -> None:
    good = encode_jpeg(np.random.default_rng(2).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    image, damage = decode_image_checked(damage_entropy(good))
    assert image.shape == (112, 112, 3) and damage  # libjpeg: "Corrupt JPEG data: ..." or "Unsupported marker"
    assert decode_image_checked(good)[1] is None
    with pytest.raises(CorruptImageError, match="damaged JPEG data"):
        decode_image(damage_entropy(good), strict=True)
    assert decode_image(damage_entropy(good)).shape == (112, 112, 3)  # not strict: still decodes


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_counts_damaged_records_and_names_them(tmp_path: Path, workers: int) -> None:
    pack = open_pack(_pack(tmp_path / "p"))
    logs: list[str] = []
    loader = TrainLoader(pack, 4, workers=workers, flip=False, log=logs.append)
    assert len(list(loader)) == 2
    assert loader.damaged == 2
    where = [pack.where(i) for i in range(len(pack)) if any(pack.where(i) in w for w in loader.damaged_where)]
    assert len(where) == 2
    text = "\n".join(line for line in logs if "damaged JPEG data" in line)
    assert all(w in text for w in where) and "data.strict_decode=true" in text and "(2 so far" in text


def test_strict_decode_stops_or_skips(tmp_path: Path) -> None:
    cfg = load_config(None, ["--train.max_steps=1", "--data.strict_decode=true"])
    assert cfg.data.strict_decode is True
    pack = open_pack(_pack(tmp_path / "p"))
    with pytest.raises(CorruptImageError) as info:
        list(TrainLoader(pack, 4, workers=1, flip=False, strict_decode=True))
    text = str(info.value)
    assert "\n" not in text and "train.rec: key" in text and "damaged JPEG data" in text
    assert "strict_decode=true" in text
    logs: list[str] = []
    loader = TrainLoader(pack, 4, workers=0, flip=False, strict_decode=True, skip_corrupt=True, log=logs.append)
    assert len(list(loader)) == 2 and loader.skipped == 2 and loader.damaged == 0


def test_embed_warns_with_positions() -> None:
    rng = np.random.default_rng(1)
    images = [encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(4)]
    images[3] = damage_entropy(images[3])
    with pytest.warns(UserWarning, match=r"1 image\(s\) decoded from damaged JPEG data .*positions 3 "):
        assert decode_images(images).shape == (4, 112, 112, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_images(images[:3])  # intact images: no warning


def test_property_declaring_unused_classes_warns_with_both_counts(tmp_path: Path) -> None:
    # labels 0 and 3 reach the top class, yet classes 1 and 2 are never used
    pack = open_pack(raw_pack(tmp_path / "gap", [0, 3, 0, 3], classes=4))
    logs: list[str] = []
    list(TrainLoader(pack, 2, workers=0, log=logs.append))
    assert any("declares 4 classes but the labels of one epoch use 2 of them" in line for line in logs), logs
    logs.clear()
    list(TrainLoader(open_pack(raw_pack(tmp_path / "full", [0, 1, 2, 3], classes=4)), 2, workers=0,
                     log=logs.append))
    assert not any("declares" in line for line in logs)
