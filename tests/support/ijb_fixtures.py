"""Loose face crops with known landmarks, and a small IJB-shaped folder built from them.

A synthetic 112x112 face (megaface.data.synthetic) is placed into a larger noisy canvas by a known random
similarity S (crop -> canvas); its landmarks in the canvas are S applied to the ArcFace template points (plus
optional detector noise), so aligning the canvas from those landmarks must give the face back.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from megaface.data.align import ARCFACE_TEMPLATE
from megaface.data.decode import encode_jpeg
from megaface.data.synthetic import generate


def random_similarity(rng: np.random.Generator, canvas: int) -> np.ndarray:
    """[2, 3] crop -> canvas: scale 1.3-2.2, rotation within +-30 degrees, the face inside the canvas."""
    scale, angle = rng.uniform(1.3, 2.2), np.deg2rad(rng.uniform(-30, 30))
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = rng.uniform(0.45, 0.55, 2) * canvas
    return np.hstack([rot, (centre - rot @ np.array([56.0, 56.0]))[:, None]])


def loose_crop(face: np.ndarray, similarity: np.ndarray, rng: np.random.Generator, canvas: int = 256,
               landmark_noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """-> uint8 [canvas, canvas, 3] with `face` warped in, and the face's 5 points there [5, 2] float32."""
    background = rng.integers(0, 256, (canvas, canvas, 3), dtype=np.uint8)
    image = cv2.warpAffine(face, similarity, (canvas, canvas), dst=background, borderMode=cv2.BORDER_TRANSPARENT)
    points = ARCFACE_TEMPLATE @ similarity[:, :2].T + similarity[:, 2]
    points = points + rng.normal(0.0, landmark_noise, points.shape)
    return image, points.astype(np.float32)


def write_ijb(root: Path, identities: int = 6, templates_per_id: int = 3, seed: int = 0,
              target: str = "IJBC", variants: int | None = None) -> dict:
    """An IJB-shaped folder: loose_crop/<n>.jpg and meta/ with the three files eval_ijbc.py reads.

    Templates hold 1-2 media of 1-2 frames each; detector scores 0.5-1.0; landmarks with 1 px noise.
    Pairs: every template pair (genuine and impostor). Returns counts for the test's assertions.
    `variants`: draw each identity's faces from only this many synthetic images (each placed anew), so that
    even an untrained network separates identities and the ROC has steep steps; None: every face distinct.
    """
    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    tid_mid, five_pts, template_identity = [], [], {}
    media = 0
    for ident in range(identities):
        for t in range(templates_per_id):
            tid = 1 + ident * templates_per_id + t
            template_identity[tid] = ident
            for _ in range(rng.integers(1, 3)):
                media += 1
                for _ in range(rng.integers(1, 3)):
                    name = f"{len(tid_mid) + 1}.jpg"
                    index = len(tid_mid) if variants is None else int(rng.integers(variants))
                    face = generate([ident], [index], seed=seed)[0]
                    image, points = loose_crop(face, random_similarity(rng, 256), rng, landmark_noise=1.0)
                    (root / "loose_crop" / name).write_bytes(encode_jpeg(image, quality=90))
                    score = rng.uniform(0.5, 1.0)
                    tid_mid.append(f"{name} {tid} {media}")
                    five_pts.append(" ".join([name, *(f"{v:.3f}" for v in points.reshape(-1)), f"{score:.6f}"]))
    tids = sorted(template_identity)
    pairs = [f"{a} {b} {int(template_identity[a] == template_identity[b])}" for i, a in enumerate(tids)
             for b in tids[i + 1:]]
    prefix = target.lower()
    (root / "meta" / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (root / "meta" / f"{prefix}_name_5pts_score.txt").write_text("\n".join(five_pts) + "\n")
    (root / "meta" / f"{prefix}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return {"images": len(tid_mid), "templates": len(tids), "pairs": len(pairs)}
