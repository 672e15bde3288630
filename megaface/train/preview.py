"""`megaface pack preview`: a grid of training samples as the input path makes them, for a person to look at.

    megaface pack preview --pack /data/faces_emore --config launch/configs/adaface_r50.yaml -o grid.png

Reads the first global batch of epoch 0 the way training does (the experiment's data.seed, data.flip and
data.augment, the same random numbers per sample), runs the augmentations on this machine's CPU and writes
the pixels before normalisation as one PNG (rows of `--columns` images). Left to right, top to bottom is
the batch order.
"""

from __future__ import annotations

import argparse
import math

import cv2
import numpy as np
import torch

from megaface.config import load_config
from megaface.data import open_pack
from megaface.data.augment import augment_pixels
from megaface.data.loader import TrainLoader
from megaface.fileio import atomic_output_file


def _open(path: str):
    """A RecordIO or OFRecord pack directory, or an image folder root/<identity>/*.jpg."""
    from pathlib import Path

    from megaface.data import FolderDataset
    from megaface.data.ofrecord import is_ofrecord_dir

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--pack {path!r} is not a directory (a pack with train.rec, an OFRecord "
                                "directory or an image folder)")
    if (root / "train.rec").exists() or is_ofrecord_dir(root):
        return open_pack(root)
    return FolderDataset(root)


def preview_grid(pack: str, config: str | None, count: int = 32, columns: int = 8,
                 overrides: list[str] | None = None) -> np.ndarray:
    """uint8 RGB [rows*H, columns*W, 3]: the first `count` samples of epoch 0 after flip and augmentation."""
    if count < 1 or columns < 1:
        raise ValueError(f"--count={count} and --columns={columns} must be >= 1")
    cfg = load_config(config, ["--train.max_steps=1", *(overrides or [])])
    dataset = _open(pack)
    loader = TrainLoader(dataset, min(count, len(dataset)), seed=cfg.data.seed, workers=0, flip=cfg.data.flip,
                         on_device=True, augment=cfg.data.augment)
    raw, _ = next(iter(loader))
    x = raw.images.to(torch.float32)
    if raw.augment.enabled and raw.uniforms is not None:  # the loader draws them whenever one is on
        x = augment_pixels(x, raw.uniforms, raw.augment)
    images = x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * h, min(columns, n) * w, 3), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megaface pack preview", description=__doc__.splitlines()[0])
    parser.add_argument("--pack", required=True, help="training pack (RecordIO or OFRecord dir) or image folder")
    parser.add_argument("--config", help="experiment YAML whose data.augment / data.flip / data.seed to use")
    parser.add_argument("-o", "--output", required=True, help="the PNG to write")
    parser.add_argument("--count", type=int, default=32, help="samples to show (the first global batch)")
    parser.add_argument("--columns", type=int, default=8, help="images per row")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        raise ValueError(f"unexpected arguments {bad}; config overrides look like --data.augment.crop_p=0.5")
    grid = preview_grid(args.pack, args.config, args.count, args.columns, overrides)
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode the {grid.shape} grid as PNG")
    with atomic_output_file(args.output) as tmp:
        tmp.write_bytes(png.tobytes())
    print(f"wrote {args.output}: {grid.shape[1]}x{grid.shape[0]} pixels, up to {args.count} samples")
    return 0
