"""Label noise and low-quality faces for the synthetic set: the evidence base for sub-center ArcFace and AdaFace.

`megaface pack synthetic --mislabel-share F --low-quality-share Q` writes the usual pack and val.bin plus:
- a share F of the training records carrying a wrong label: the image is drawn from its true identity and
  labelled with another, uniformly chosen one (web-crawl label noise, what sub-center ArcFace is for);
- a share Q of the training images degraded (`degrade`): low resolution (down to 14-28 px and back up),
  strong blur, and/or a large occluding block - the hard samples AdaFace's margin is meant to spare;
- `val_lq.bin`: the verification pairs of val.bin with every image degraded the same way (Q > 0 only);
- `noise.json`: which records (positions in the pack) are mislabelled, with their true identity, and which
  are degraded, so a cleaning step can be scored against the truth. The pack groups records by class, as the
  format requires, so a mislabelled image is stored among the images of the class it is labelled with.
Everything derives from the seed (its own random streams), like the clean set; F = Q = 0 writes the clean set
byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_LABEL_STREAM, _QUALITY_STREAM = 11, 12
NOISE_FILE = "noise.json"
LOW_QUALITY_BIN = "val_lq.bin"


@dataclass(frozen=True)
class SyntheticNoise:
    """Shares of mislabelled and of degraded training images (each in [0, 1))."""

    mislabel_share: float = 0.0
    low_quality_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("mislabel_share", "low_quality_share"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= float(value) < 1.0):
                raise ValueError(f"synthetic {name}={value!r} must lie in [0, 1) (a share of the training images; "
                                 "0 = none)")

    @property
    def any(self) -> bool:
        return self.mislabel_share > 0 or self.low_quality_share > 0


def noisy_labels(true_labels: np.ndarray, identities: int, share: float, seed: int) -> np.ndarray:
    """Labels with round(share * N) records (chosen by the seed) moved to another identity."""
    labels = true_labels.copy()
    count = int(round(share * len(labels)))
    if count == 0:
        return labels
    rng = np.random.default_rng((seed, _LABEL_STREAM))
    picked = rng.choice(len(labels), size=count, replace=False)
    labels[picked] = (labels[picked] + rng.integers(1, identities, size=count)) % identities  # never the true one
    return labels


def low_quality_mask(count: int, share: float, seed: int, stream: int = 0) -> np.ndarray:
    """bool [count]: round(share * count) records (chosen by the seed) to degrade."""
    mask = np.zeros(count, dtype=bool)
    n = int(round(share * count))
    if n:
        mask[np.random.default_rng((seed, _QUALITY_STREAM, stream)).choice(count, size=n, replace=False)] = True
    return mask


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [H, W, 3] face -> a low-quality version: at least one of low resolution, strong blur and a
    large occlusion (each drawn with probability 1/2, one forced when none was drawn)."""
    h, w = image.shape[:2]
    kinds = rng.uniform(size=3) < 0.5
    if not kinds.any():
        kinds[rng.integers(3)] = True
    out = image
    if kinds[0]:  # low resolution: down to 14-28 px, back up bilinearly
        side = int(rng.integers(14, 29))
        small = cv2.resize(out, (side, side), interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if kinds[1]:  # strong blur
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(2.0, 4.0)))
    if kinds[2]:  # a block over 25-50% of the side in each direction, somewhere on the face
        bh, bw = int(h * rng.uniform(0.25, 0.5)), int(w * rng.uniform(0.25, 0.5))
        y, x = int(rng.integers(h // 6, h - bh)), int(rng.integers(w // 6, w - bw))
        out = out.copy()
        out[y:y + bh, x:x + bw] = rng.integers(0, 256, 3).astype(np.uint8)
    return np.ascontiguousarray(out)


def degrade_batch(images: np.ndarray, mask: np.ndarray, seed: int, first: int, stream: int = 0) -> np.ndarray:
    """Degrade images[i] where mask[i]; record first + i draws from its own stream (order-independent)."""
    out = images.copy()
    for i in np.flatnonzero(mask):
        out[i] = degrade(images[i], np.random.default_rng((seed, _QUALITY_STREAM, stream, first + int(i))))
    return out
