"""The input path on the device (megaface.data.augment): uint8 in, the same normalised batch out as the
former CPU path, augmentations that do what they say, random numbers that depend on the sample only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaface.config import load_config
from megaface.data.augment import (
    NUM_SLOTS,
    SLOT_CROP,
    SLOT_GRAY,
    Augment,
    RawBatch,
    augment_pixels,
    prepare_batch,
    sample_uniforms,
)
from megaface.data.loader import TrainLoader
from megaface.data.synthetic import SyntheticDataset


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(1, 256, (n, 3, 112, 112), dtype=np.uint8))  # no 0: a zeroed pixel is the crop's


def test_uniforms_are_a_function_of_the_sample_only() -> None:
    u = sample_uniforms(3, 1, np.array([5, 9, 2]))
    assert u.shape == (3, NUM_SLOTS) and u.dtype == np.float32 and 0 <= u.min() and u.max() < 1
    np.testing.assert_array_equal(sample_uniforms(3, 1, np.array([2, 5]))[1], u[0])  # any batch, any order
    assert not np.array_equal(sample_uniforms(3, 2, np.array([5])), u[:1])  # another epoch
    assert not np.array_equal(sample_uniforms(4, 1, np.array([5])), u[:1])  # another seed
    many = sample_uniforms(0, 0, np.arange(20000))
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float((many < 0.1).mean()) - 0.1) < 0.01


@pytest.mark.parametrize("workers", [0, 1])
def test_device_path_equals_the_cpu_path_bit_for_bit(workers: int) -> None:
    """No augmentation: the uint8 batch normalised on the device is the former CPU batch."""
    data = SyntheticDataset(6, 4, seed=0)
    cpu = TrainLoader(data, 8, seed=1, workers=workers, normalize="oneflow")
    dev = TrainLoader(data, 8, seed=1, workers=workers, normalize="oneflow", on_device=True,
                      device=torch.device("cpu"))
    pairs = list(zip(cpu, dev, strict=True))
    assert len(pairs) == 3
    for (images, labels), (raw, raw_labels) in pairs:
        assert isinstance(raw, RawBatch) and raw.images.dtype == torch.uint8 and raw.uniforms is None
        assert torch.equal(prepare_batch(raw, "oneflow"), images) and torch.equal(raw_labels, labels)
    nhwc = prepare_batch(raw, "oneflow", torch.bfloat16, torch.channels_last)
    assert nhwc.dtype == torch.bfloat16 and nhwc.is_contiguous(memory_format=torch.channels_last)


def test_loader_state_counts_the_batch_copied_ahead() -> None:
    """With a device the loader holds the next batch already; its state must not count it as consumed."""
    data = SyntheticDataset(6, 4, seed=0)
    aug = Augment(crop_p=0.5, gray_p=0.5)
    run = TrainLoader(data, 4, seed=2, workers=0, on_device=True, augment=aug, device=torch.device("cpu"))
    seen = []
    for k, (raw, _) in enumerate(run):
        seen.append(raw)
        if k == 2:
            state = run.state_dict()
            break
    assert state["position"] == 3 * 4
    resumed = TrainLoader(data, 4, seed=2, workers=0, on_device=True, augment=aug, device=torch.device("cpu"))
    resumed.load_state_dict(state)
    rest = [raw for raw, _ in resumed]
    whole = [raw for raw, _ in TrainLoader(data, 4, seed=2, workers=0, on_device=True, augment=aug,
                                          device=torch.device("cpu"))]
    assert len(whole) == 6 and len(rest) == 3
    for a, b in zip(rest, whole[3:], strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.uniforms, b.uniforms)
    run.load_state_dict(state)  # an abandoned iteration gives its batch back
    assert [raw.images.sum() for raw, _ in run] == [raw.images.sum() for raw in whole[3:]]


def test_off_is_identity_and_p1_changes_every_sample() -> None:
    x = _images().float()
    u = torch.from_numpy(sample_uniforms(0, 0, np.arange(6)))
    assert torch.equal(augment_pixels(x.clone(), u, Augment()), x)
    for options in ({"crop_p": 1.0}, {"crop_p": 1.0, "crop_mode": "resize", "crop_scale": (0.3, 0.5)},
                    {"lowres_p": 1.0, "lowres_side": (0.2, 0.5)}, {"blur_p": 1.0}, {"photometric_p": 1.0},
                    {"hsv_p": 1.0, "hsv_hue": (10.0, 20.0)}, {"gray_p": 1.0}):
        out = augment_pixels(x.clone(), u, Augment(**options))
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255, options
        assert torch.equal(out, out.round()), options  # whole pixel values, as a uint8 pipeline makes
        changed = (out != x).flatten(1).any(1)
        assert changed.all(), (options, changed)


def test_each_augmentation_does_what_it_says() -> None:
    x = _images(4).float()
    u = torch.from_numpy(sample_uniforms(0, 0, np.arange(4)))
    padded = augment_pixels(x.clone(), u, Augment(crop_p=1.0, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0)))
    kept = padded.flatten(1).ne(0).float().mean(1)  # a 56x56 window of the original, zero elsewhere
    assert torch.allclose(kept, torch.full((4,), 56 * 56 / 112 ** 2), atol=0.01)
    window = padded[0].ne(0).any(0)
    rows, cols = window.nonzero().T
    box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    assert torch.equal(padded[0][:, box[0], box[1]], x[0][:, box[0], box[1]])
    gray = augment_pixels(x.clone(), u, Augment(gray_p=1.0))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    same = augment_pixels(x.clone(), u, Augment(hsv_p=1.0, hsv_hue=(0.0, 0.0), hsv_saturation=(1.0, 1.0)))
    assert (same - x).abs().max() <= 1  # RGB -> HSV -> RGB round trip, whole pixels
    unchanged = augment_pixels(x.clone(), u, Augment(photometric_p=1.0, brightness=0, contrast=0, saturation=0))
    assert torch.equal(unchanged, x)
    smooth = torch.full((1, 3, 112, 112), 100.0)
    smooth[..., 56:] = 200.0  # a vertical edge: blurred, it ramps; the flat parts stay flat
    blurred = augment_pixels(smooth.clone(), u[:1], Augment(blur_p=1.0, blur_sigma=(1.5, 1.5)))
    assert blurred[0, 0, 50, 10] == 100 and blurred[0, 0, 50, 100] == 200 and 100 < blurred[0, 0, 50, 56] < 200
    full = augment_pixels(smooth.clone(), u[:1], Augment(lowres_p=1.0, lowres_side=(1.0, 1.0)))
    assert torch.equal(full, smooth)  # a "small" side of the whole image is no change


def test_probability_picks_the_samples_by_their_own_numbers() -> None:
    x = _images(6).float()
    u = torch.from_numpy(sample_uniforms(5, 0, np.arange(6)))
    out = augment_pixels(x.clone(), u, Augment(crop_p=0.5, gray_p=0.5))
    cropped = (out == 0).flatten(1).any(1) & ~(x == 0).flatten(1).any(1)
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert torch.equal(cropped, u[:, SLOT_CROP] < 0.5)
    assert torch.equal(gray, u[:, SLOT_GRAY] < 0.5)


def test_augmentations_need_the_device_path() -> None:
    with pytest.raises(ValueError, match=r"^data\.augment runs on the training device: set data\.prepare=device"):
        TrainLoader(SyntheticDataset(4, 4), 4, augment=Augment(gray_p=0.1))
    with pytest.raises(ValueError, match=r"^data\.augment runs on the training device: set data\.prepare=device"):
        load_config(None, ["--train.max_steps=9", "--data.prepare=host", "--data.augment.gray_p=0.1"])


def test_pack_preview_writes_a_grid(tmp_path, capsys) -> None:
    import cv2

    from megaface.cli import main
    from megaface.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "pack", 6, 3, val_pairs=4)
    config = tmp_path / "aug.yaml"
    config.write_text("data:\n  augment:\n    crop_p: 0.5\n    gray_p: 0.5\ntrain:\n  max_steps: 1\n")
    out = tmp_path / "grid.png"
    assert main(["pack", "preview", "--pack", str(tmp_path / "pack"), "--config", str(config), "-o", str(out),
                 "--count", "12", "--columns", "4"]) == 0
    grid = cv2.imread(str(out))
    assert grid.shape == (3 * 112, 4 * 112, 3)
    assert main(["pack", "preview", "--pack", str(tmp_path / "pack"), "-o", str(out), "--data.augment.crop_p=2"]) == 2
    assert "data.augment.crop_p=2" in capsys.readouterr().err
