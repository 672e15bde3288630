"""Synthetic identities: procedurally drawn, face-like 112x112 RGB images, deterministic from a seed.

Each identity draws a fixed structure (face outline and jaw shape, skin tone, hair colour/volume/fringe,
eye spacing/size/iris colour, brow shape, nose, mouth, moles, glasses); each image adds nuisance on top
(in-plane pose: shift, scale, rotation; expression: eye opening, smile, open mouth, brow raise; illumination:
gain, white balance, directional light; background; blur and noise; occasional occluding block). The
per-image colour nuisance is deliberately larger than the identity's colour signal, so the mean colour of
an image says little about who it is (tests check a mean-colour model stays near chance) while the geometry
is learnable by a small CNN (tests check >= 90% verification on unseen identities).

Rendering is vectorised over a batch of images with numpy (soft masks from signed distances).
Everything derives from ``numpy.random.default_rng((seed, identity, ...))``, so any image can be
regenerated alone, in any order, in any process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from megaface.data.bin_pack import save_bin
from megaface.data.decode import encode_jpeg
from megaface.data.packs import PackWriter
from megaface.data.synthetic_noise import (
    LOW_QUALITY_BIN,
    NOISE_FILE,
    SyntheticNoise,
    degrade_batch,
    low_quality_mask,
    noisy_labels,
)
from megaface.fileio import atomic_output_dir, make_temp_dir

# The one set of defaults for synthetic data: the config section (data.synthetic), `megaface pack synthetic`
# and `build_dataset("synthetic")` all read these.
DEFAULT_IDENTITIES = 200
DEFAULT_IMAGES_PER_IDENTITY = 20
DEFAULT_VAL_PAIRS = 1000
DEFAULT_SEED = 0

SIZE = 112
_ID_STREAM, _IMG_STREAM, _VAL_STREAM = 1, 2, 3
# held-out identities for the .bin are numbered from here: disjoint from any training identity
HELD_OUT_BASE = 1 << 30


def identity_params(seed: int, identity: int) -> dict[str, Any]:
    """The fixed structure of one identity (all values float64 arrays of shape [] or [k])."""
    r = np.random.default_rng((seed, _ID_STREAM, identity))
    u = r.uniform
    return {
        "face_ax": u(0.52, 0.72), "face_ay": u(0.68, 0.86), "face_p": u(1.7, 3.0), "face_cy": u(0.02, 0.14),
        "skin": np.array([u(150, 225), u(105, 170), u(80, 140)]),
        "hair": r.choice([[30, 22, 18], [70, 45, 25], [120, 80, 40], [180, 150, 90], [90, 90, 95], [150, 60, 30]])
        + r.uniform(-15, 15, 3),
        "hair_line": u(-0.62, -0.25), "hair_amp": u(0.0, 0.14), "hair_freq": u(2.0, 9.0), "hair_phase": u(0, 6.3),
        "hair_vol": u(1.0, 1.25), "hair_len": u(-0.3, 0.45),
        "eye_x": u(0.2, 0.36), "eye_y": u(-0.22, -0.02), "eye_rx": u(0.08, 0.14), "eye_ry": u(0.035, 0.07),
        "eye_tilt": u(-0.25, 0.25), "iris": r.choice([[60, 40, 25], [40, 90, 140], [70, 120, 70], [110, 80, 40]])
        + r.uniform(-15, 15, 3),
        "brow_dy": u(0.08, 0.17), "brow_th": u(0.015, 0.045), "brow_tilt": u(-0.35, 0.35), "brow_len": u(0.1, 0.2),
        "nose_len": u(0.15, 0.32), "nose_w": u(0.05, 0.12), "mouth_y": u(0.36, 0.56), "mouth_w": u(0.14, 0.3),
        "mouth_th": u(0.02, 0.05), "mouth_curve": u(-0.6, 0.9), "lip": np.array([u(140, 200), u(50, 90), u(60, 100)]),
        "moles": np.concatenate([u(-0.5, 0.5, (3, 2)), (u(0, 1, (3, 1)) < 0.45) * u(0.015, 0.035, (3, 1))], axis=1),
        "glasses": float(u() < 0.2),
    }


def image_params(rng: np.random.Generator, size: int = SIZE) -> dict[str, Any]:
    """Per-image nuisance (including its own noise field, so an image never depends on its batch)."""
    u = rng.uniform
    occl = u() < 0.12
    return {
        "tx": u(-0.09, 0.09), "ty": u(-0.09, 0.09), "scale": u(0.88, 1.12), "rot": u(-0.2, 0.2),
        "yaw": u(-0.08, 0.08), "eye_open": u(0.45, 1.15), "smile": u(-0.35, 0.35), "mouth_open": u(0, 1) ** 3,
        "brow_raise": u(-0.03, 0.04),
        "bg": u(0, 255, 3), "bg_grad": u(-60, 60, 3),
        "gain": u(0.6, 1.3), "wb": u(0.78, 1.22, 3), "light": u(-0.35, 0.35, 2),
        "noise": u(1.0, 8.0), "blur": float(u() < 0.25),
        "occl": np.array([float(occl), u(-1, 0.6), u(-1, 0.6), u(0.25, 0.6), u(0.15, 0.45), *u(0, 255, 3)]),
        "noise_field": rng.standard_normal((size, size, 3), dtype=np.float32),
    }


def _stack(dicts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(d[k], dtype=np.float64) for d in dicts]) for k in dicts[0]}


def _b(a: np.ndarray) -> np.ndarray:
    """[N] -> [N, 1, 1] for broadcasting against [N, H, W] grids."""
    return a.reshape(-1, 1, 1)


def _soft(d: np.ndarray, px: float) -> np.ndarray:
    """Signed distance (negative inside) -> anti-aliased coverage in [0, 1] with an edge about `px` wide."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """In-place alpha blend: img [N,H,W,3], mask [N,H,W], colour [N,3] or [N,H,W,3].

    Only covered pixels are touched: most features cover a few percent of the image.
    """
    n, h, w, _ = img.shape
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return
    pix = img.reshape(-1, 3)
    alpha = mask.reshape(-1)[flat, None]
    col = colour.reshape(-1, 3)[flat] if colour.ndim == 4 else np.asarray(colour, np.float32)[flat // (h * w)]
    pix[flat] += alpha * (col - pix[flat])


def _grid(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    g = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
    return np.broadcast_to(g[None, None, :], (n, size, size)), np.broadcast_to(g[None, :, None], (n, size, size))


def render(idp: dict[str, np.ndarray], imp: dict[str, np.ndarray], size: int = SIZE) -> np.ndarray:
    """Stacked identity + image parameters (leading dim N) -> uint8 [N, size, size, 3] RGB.

    Shapes are drawn at half resolution and upscaled (bilinear) for sizes >= 80: drawing is the
    expensive part and scales with the pixel count; lighting, occlusion and noise are applied at full size.
    """
    idp = {k: a.astype(np.float32) for k, a in idp.items()}
    imp = {k: a.astype(np.float32) for k, a in imp.items()}
    canvas = (size + 1) // 2 if size >= 80 else size
    img = _draw(idp, imp, canvas)
    if canvas != size:
        img = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in img])
    return _finish(img, imp, size)


def _draw(idp: dict[str, np.ndarray], imp: dict[str, np.ndarray], size: int) -> np.ndarray:
    n = imp["tx"].shape[0]
    X, Y = _grid(n, size)
    c, s, sc = _b(np.cos(imp["rot"])), _b(np.sin(imp["rot"])), _b(imp["scale"])
    u = (c * (X - _b(imp["tx"])) + s * (Y - _b(imp["ty"]))) / sc
    v = (-s * (X - _b(imp["tx"])) + c * (Y - _b(imp["ty"]))) / sc
    px = 2.0 / size * 1.2
    img = imp["bg"][:, None, None, :] + Y[..., None] * imp["bg_grad"][:, None, None, :]
    img = np.ascontiguousarray(img, dtype=np.float32)
    fu = u - _b(imp["yaw"]) * 0.5  # facial features slide sideways with yaw; the outline less so
    ax, ay, cy = _b(idp["face_ax"]), _b(idp["face_ay"]), _b(idp["face_cy"])
    # hair volume behind the face
    hv = _b(idp["hair_vol"])
    hair_d = np.sqrt((u / (ax * hv * 1.1)) ** 2 + ((v - cy + 0.05) / (ay * hv)) ** 2) - 1
    hair_d = np.maximum(hair_d, v - cy - _b(idp["hair_len"]))
    _paint(img, _soft(hair_d, px), idp["hair"])
    # face: superellipse with a roundness shading
    p = _b(idp["face_p"])
    face_d = (np.abs(u / ax) ** p + np.abs((v - cy) / ay) ** p) ** (1 / p) - 1
    face_m = _soft(face_d * 0.7, px)
    shade = 1 - 0.28 * np.clip((u / ax) ** 2 + 0.3 * ((v - cy) / ay) ** 2, 0, 1.3)
    _paint(img, face_m, idp["skin"][:, None, None, :] * shade[..., None])
    # fringe: the face above a wavy hairline takes the hair colour
    line = _b(idp["hair_line"]) + _b(idp["hair_amp"]) * np.sin(_b(idp["hair_freq"]) * u + _b(idp["hair_phase"]))
    _paint(img, face_m * _soft(v - line, px), idp["hair"])
    _draw_eyes(img, idp, imp, fu, v, px)
    _draw_nose_mouth(img, idp, imp, fu, v, px)
    for k in range(3):
        m = idp["moles"][:, k]
        r = _b(m[:, 2]) + 1e-6
        d = np.sqrt((fu - _b(m[:, 0]) * ax) ** 2 + (v - _b(m[:, 1]) * ay) ** 2) - r
        _paint(img, _soft(d, px) * face_m * (r > 1e-3), np.full((n, 3), 55.0))
    return img


def _draw_eyes(img, idp, imp, fu, v, px) -> None:
    n = fu.shape[0]
    ex, ey, rx = _b(idp["eye_x"]), _b(idp["eye_y"]), _b(idp["eye_rx"])
    ry = _b(idp["eye_ry"] * imp["eye_open"])
    for side in (-1.0, 1.0):
        du, dv = fu - side * ex, v - ey - side * _b(idp["eye_tilt"]) * (fu - side * ex)
        d = np.sqrt((du / rx) ** 2 + (dv / ry) ** 2) - 1
        white = _soft(d * np.minimum(rx, ry), px)
        _paint(img, white, np.full((n, 3), 235.0))
        iris_r = np.minimum(rx * 0.55, 0.06)
        _paint(img, white * _soft(np.sqrt(du**2 + dv**2) - iris_r, px), idp["iris"])
        _paint(img, white * _soft(np.sqrt(du**2 + dv**2) - iris_r * 0.45, px), np.full((n, 3), 15.0))
        # brow: a thick tilted segment above the eye
        bu = fu - side * ex
        bv = v - (ey - _b(idp["brow_dy"]) - _b(imp["brow_raise"])) - side * _b(idp["brow_tilt"]) * bu
        bd = np.maximum(np.abs(bv) - _b(idp["brow_th"]), np.abs(bu) - _b(idp["brow_len"]))
        _paint(img, _soft(bd, px), idp["hair"] * 0.8)
        if idp["glasses"].any():
            rim = np.abs(np.sqrt(du**2 + (dv * 1.3) ** 2) - rx * 1.45) - 0.012
            _paint(img, _soft(rim, px) * _b(idp["glasses"]), np.full((n, 3), 25.0))


def _draw_nose_mouth(img, idp, imp, fu, v, px) -> None:
    n = fu.shape[0]
    ey, nl, nw = _b(idp["eye_y"]), _b(idp["nose_len"]), _b(idp["nose_w"])
    tip = ey + 0.08 + nl
    ridge = np.maximum(np.abs(fu) - nw * np.clip((v - ey) / nl, 0, 1), np.maximum(ey + 0.08 - v, v - tip))
    _paint(img, 0.35 * _soft(ridge, px), idp["skin"] * 0.6)
    for side in (-1.0, 1.0):
        d = np.sqrt(((fu - side * nw * 0.8) / 0.03) ** 2 + ((v - tip) / 0.018) ** 2) - 1
        _paint(img, _soft(d * 0.02, px), idp["skin"] * 0.35)
    my, mw = _b(idp["mouth_y"]), _b(idp["mouth_w"])
    curve = _b(idp["mouth_curve"] + imp["smile"])
    mv = v - my + curve * (fu**2 - mw**2 / 3)
    th = _b(idp["mouth_th"]) + _b(imp["mouth_open"]) * 0.05 * np.clip(1 - (fu / mw) ** 2, 0, 1)
    md = np.maximum(np.abs(mv) - th, np.abs(fu) - mw)
    _paint(img, _soft(md, px), idp["lip"])
    inner = np.maximum(np.abs(mv) - (th - _b(idp["mouth_th"]) * 0.9), np.abs(fu) - mw * 0.85)
    _paint(img, _soft(inner, px) * (_b(imp["mouth_open"]) > 0.05), np.full((n, 3), 40.0))


def _finish(img: np.ndarray, imp: dict[str, np.ndarray], size: int) -> np.ndarray:
    X, Y = _grid(img.shape[0], size)
    px = 2.0 / size
    oc = imp["occl"]
    half_w, half_h = _b(oc[:, 3] / 2), _b(oc[:, 4] / 2)
    od = np.maximum(np.abs(X - _b(oc[:, 1]) - half_w) - half_w, np.abs(Y - _b(oc[:, 2]) - half_h) - half_h)
    _paint(img, _soft(od, px) * _b(oc[:, 0]), oc[:, 5:8])
    light = 1 + _b(imp["light"][:, 0]) * X + _b(imp["light"][:, 1]) * Y
    img *= (_b(imp["gain"]) * light)[..., None] * imp["wb"][:, None, None, :]
    for k in np.flatnonzero(imp["blur"]):
        img[k] = cv2.GaussianBlur(img[k], (5, 5), 1.2)
    img += imp["noise_field"] * _b(imp["noise"])[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(identities: np.ndarray | list[int], indices: np.ndarray | list[int], seed: int = 0,
             stream: int = _IMG_STREAM, size: int = SIZE, chunk: int = 64) -> np.ndarray:
    """Images for (identity, image index) pairs -> uint8 [N, size, size, 3] RGB. Deterministic."""
    identities, indices = np.asarray(identities, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    out = np.empty((len(identities), size, size, 3), dtype=np.uint8)
    cache: dict[int, dict[str, np.ndarray]] = {}
    for a in range(0, len(identities), chunk):
        ids, idx = identities[a:a + chunk], indices[a:a + chunk]
        idp = _stack([cache.setdefault(int(i), identity_params(seed, int(i))) for i in ids])
        rngs = [np.random.default_rng((seed, stream, int(i), int(j))) for i, j in zip(ids, idx, strict=False)]
        imp = _stack([image_params(r, size) for r in rngs])
        out[a:a + chunk] = render(idp, imp, size)
    return out


class SyntheticDataset:
    """On-the-fly synthetic identities: ``ds[i] -> (label, uint8 [112, 112, 3] RGB)``, label = i // K."""

    def __init__(self, identities: int, images_per_identity: int, seed: int = 0):
        if identities < 2 or images_per_identity < 1:
            raise ValueError(
                f"synthetic data needs >= 2 identities and >= 1 image each, got identities={identities}, "
                f"images_per_identity={images_per_identity}"
            )
        self.num_classes, self.images_per_identity, self.seed = int(identities), int(images_per_identity), int(seed)
        self.image_size = (SIZE, SIZE)

    def __len__(self) -> int:
        return self.num_classes * self.images_per_identity

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"synthetic index {i} out of range for {len(self)} images")
        label, j = divmod(int(i), self.images_per_identity)
        return label, generate([label], [j], self.seed)[0]

    def labels(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) // self.images_per_identity


def verification_pairs(pairs: int, seed: int = 0, held_out: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(identity, index) of 2P images (pair order a0, b0, ...) from held-out identities, and issame [P].

    Half the pairs are "same" (two images of one identity), half "different"; order is shuffled so every
    contiguous tenth (the protocol's folds) holds both kinds.
    """
    held_out = held_out or max(20, min(2000, pairs // 3))
    r = np.random.default_rng((seed, _VAL_STREAM))
    issame = np.zeros(pairs, dtype=bool)
    issame[: pairs // 2 + pairs % 2] = True
    r.shuffle(issame)
    a = r.integers(0, held_out, pairs)
    b = np.where(issame, a, (a + r.integers(1, held_out, pairs)) % held_out)
    ids = HELD_OUT_BASE + np.stack([a, b], axis=1).ravel()
    idx = np.arange(2 * pairs, dtype=np.int64)  # every image gets its own nuisance
    return np.stack([ids, idx], axis=1), issame


def _write_all(tmp: Path, identities: int, k: int, val_pairs: int, seed: int, chunk: int = 256,
               noise: SyntheticNoise | None = None) -> None:
    noise = noise or SyntheticNoise()
    labels = np.repeat(np.arange(identities), k)
    index = np.tile(np.arange(k), identities)
    written = noisy_labels(labels, identities, noise.mislabel_share, seed)
    # a pack groups records by (written) class: a mislabelled image sits among its wrong class's images
    order = np.argsort(written, kind="stable")
    labels, index, written = labels[order], index[order], written[order]
    low = low_quality_mask(len(labels), noise.low_quality_share, seed)
    with PackWriter(tmp, (SIZE, SIZE), overwrite=True) as writer:
        for a in range(0, len(labels), chunk):
            images = generate(labels[a:a + chunk], index[a:a + chunk], seed)
            images = degrade_batch(images, low[a:a + chunk], seed, a)
            for lab, im in zip(written[a:a + chunk], images, strict=True):
                writer.add(int(lab), encode_jpeg(im))
    if val_pairs > 0:
        table, issame = verification_pairs(val_pairs, seed)
        images = generate(table[:, 0], table[:, 1], seed, stream=_VAL_STREAM)
        save_bin(tmp / "val.bin", [encode_jpeg(im) for im in images], issame.tolist())
        if noise.low_quality_share > 0:
            every = np.ones(len(images), dtype=bool)
            degraded = degrade_batch(images, every, seed, 0, stream=1)
            save_bin(tmp / LOW_QUALITY_BIN, [encode_jpeg(im) for im in degraded], issame.tolist())
    if noise.any:
        wrong = np.flatnonzero(written != labels)
        record = {"mislabel_share": noise.mislabel_share, "low_quality_share": noise.low_quality_share,
                  "seed": seed, "records": int(len(labels)),
                  "mislabelled": {"index": wrong.tolist(), "true_label": labels[wrong].tolist(),
                                  "written_label": written[wrong].tolist()},
                  "low_quality_index": np.flatnonzero(low).tolist()}
        (tmp / NOISE_FILE).write_text(json.dumps(record) + "\n")


def write_synthetic(directory: str | os.PathLike, identities: int, images_per_identity: int,
                    val_pairs: int = DEFAULT_VAL_PAIRS, seed: int = DEFAULT_SEED, overwrite: bool = False,
                    noise: SyntheticNoise | None = None) -> tuple[Path, Path]:
    """Write a synthetic pack + ``val.bin`` into `directory` (atomically: built aside, then moved in).

    `noise`: mislabelled and degraded training images, ``val_lq.bin`` and ``noise.json``
    (`megaface.data.synthetic_noise`).
    """
    SyntheticDataset(identities, images_per_identity, seed)  # validates the arguments
    directory = Path(directory)
    if directory.exists() and not overwrite and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"output {directory} exists and is not empty; pass overwrite (--force) to replace it")
    # built aside, moved in at the end; any failure (a full disk too) removes the temporary directory
    with atomic_output_dir(directory, replace=True) as tmp:
        _write_all(tmp, identities, images_per_identity, val_pairs, seed, noise=noise)
    return directory, directory / "val.bin"


def synthetic_dir(root: str | os.PathLike, identities: int, images_per_identity: int, val_pairs: int,
                  seed: int) -> Path:
    """Where `ensure_synthetic` keeps the pack for these settings (`val.bin` inside); nothing is written."""
    return Path(root) / f"synthetic_{identities}x{images_per_identity}_p{val_pairs}_s{seed}"


def ensure_synthetic(root: str | os.PathLike, identities: int, images_per_identity: int,
                     val_pairs: int = DEFAULT_VAL_PAIRS, seed: int = DEFAULT_SEED) -> tuple[Path, Path]:
    """Write (once, cached, atomically) a synthetic RecordIO pack + held-out-identity ``val.bin``.

    Returns (pack_dir, bin_path). Safe to call from several ranks at once: each builds into its own
    temporary directory; the first rename wins and the others discard their copy.
    """
    SyntheticDataset(identities, images_per_identity, seed)  # validates the arguments
    root = Path(root)
    final = synthetic_dir(root, identities, images_per_identity, val_pairs, seed)
    bin_path = final / "val.bin"
    if (final / "property").is_file():
        return final, bin_path
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final)
    try:
        _write_all(tmp, identities, images_per_identity, val_pairs, seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "property").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, bin_path
