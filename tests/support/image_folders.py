"""Image folders root/<identity>/*.jpg of small random JPEGs, for the packing and progress tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megaface.data import encode_jpeg


def make_folder(root: Path, classes: int = 7, per_class: tuple[int, ...] = (3, 1, 4, 1, 5, 2, 6), size: int = 24,
                seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"id{c:03d}").mkdir(parents=True)
        for j in range(per_class[c % len(per_class)]):
            image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            (root / f"id{c:03d}" / f"{j}.jpg").write_bytes(encode_jpeg(image, quality=70 + j))
    return root
