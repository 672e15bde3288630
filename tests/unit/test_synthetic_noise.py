"""`megaface pack synthetic --mislabel-share --low-quality-share`: label noise and degraded faces, on record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megaface.data import build_dataset, decode_image, load_bin
from megaface.data.cli import main as pack_main
from megaface.data.synthetic import generate
from megaface.data.synthetic_noise import SyntheticNoise, degrade

IDS, K, PAIRS = 6, 5, 20


def _high_frequency(image: np.ndarray) -> float:
    grey = image.astype(np.float64).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def test_noisy_pack_records_its_noise(tmp_path) -> None:
    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    base = ["synthetic", "--identities", str(IDS), "--images-per-identity", str(K), "--val-pairs", str(PAIRS)]
    assert pack_main([*base, "--output", str(clean)]) == 0
    assert pack_main([*base, "--output", str(noisy), "--mislabel-share", "0.2", "--low-quality-share", "0.3"]) == 0
    assert not (clean / "noise.json").exists() and not (clean / "val_lq.bin").exists()
    record = json.loads((noisy / "noise.json").read_text())
    wrong, low = record["mislabelled"], record["low_quality_index"]
    assert len(wrong["index"]) == 6 and len(low) == 9  # round(0.2 * 30), round(0.3 * 30)
    a, b = build_dataset("recordio", clean), build_dataset("recordio", noisy)
    clean_images = {a[i][1]: a[i][0] for i in range(IDS * K)}  # image bytes -> true label
    labels = [b[i][0] for i in range(IDS * K)]
    assert labels == sorted(labels)  # grouped by (written) class, as the pack format requires
    sharp, blurred = [], []
    for i in range(IDS * K):
        label, image = b[i]
        if i in wrong["index"]:
            j = wrong["index"].index(i)
            assert label == wrong["written_label"][j] != wrong["true_label"][j]
        if i in low:  # degraded: no clean image has these bytes
            assert image not in clean_images
            continue
        true = clean_images[image]  # not degraded: byte-identical to the clean pack's image of that identity
        assert (true != label) == (i in wrong["index"]), i
    for i in range(IDS * K):
        if i in low:
            blurred.append(_high_frequency(decode_image(b[i][1])))
        else:
            sharp.append(_high_frequency(decode_image(b[i][1])))
    assert np.mean(blurred) < np.mean(sharp)  # low resolution and blur remove detail
    lq_images, lq_same = load_bin(noisy / "val_lq.bin")
    hq_images, hq_same = load_bin(noisy / "val.bin")
    assert lq_same == hq_same and len(lq_images) == len(hq_images) == 2 * PAIRS
    assert all(x != y for x, y in zip(lq_images, hq_images, strict=True))
    assert (clean / "val.bin").read_bytes() == (noisy / "val.bin").read_bytes()


def test_degrade_is_seeded_and_shares_are_checked() -> None:
    image = generate([0], [0])[0]
    one = degrade(image, np.random.default_rng(3))
    assert np.array_equal(one, degrade(image, np.random.default_rng(3))) and not np.array_equal(one, image)
    with pytest.raises(ValueError, match=r"mislabel_share=1.0 must lie in \[0, 1\)"):
        SyntheticNoise(mislabel_share=1.0)
    with pytest.raises(ValueError, match="low_quality_share=-0.1"):
        SyntheticNoise(low_quality_share=-0.1)
