"""IJB-B / IJB-C 1:1 template verification: TAR at FAR 1e-6 ... 1e-1.

Protocol files (the public IJB layout, one record per line, whitespace-separated):

| file (in `meta_dir`)               | line                               |
|------------------------------------|------------------------------------|
| `<prefix>_face_tid_mid.txt`        | `<image name> <template id> <media id>` |
| `<prefix>_template_pair_label.txt` | `<template 1> <template 2> <label 0/1>` |
| `<prefix>_name_5pts_score.txt`     | `<image name> x1 y1 ... x5 y5 <detector score>` (same order as the face list) |

`prefix` is `ijbc` or `ijbb` (lower-case target name). Features are one row per line of the face list, in
that order; when a `<features>.paths.txt` written by `megaface embed` sits next to the features, rows are
matched to the list by image file name instead.

Template feature (`pooling`), then L2-normalised; a pair's score is the cosine of its two templates:

| pooling         | image feature                        | media          | template        |
|-----------------|--------------------------------------|----------------|-----------------|
| `arcface_torch` | as embedded (norm kept) x detector score | mean of frames | sum of media |
| `unit`          | L2-normalised                        | mean of frames | mean of media   |

`arcface_torch` is what arcface_torch's eval_ijbc.py does (its default N1 D1 F2 mode: the feature norm and
the detector score both weigh an image, the flipped image's embedding is added); `unit` ignores both.
TAR@FAR reads the ROC of scikit-learn's `roc_curve` at the point whose FAR is nearest to each target and,
among points at that FAR (a vertical step of the ROC), the highest TAR: the convention of eval_ijbc.py and
of the published IJB numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from megaface.data.align import FaceRecord, read_ijb_landmarks
from megaface.vocab import IJB_POOLINGS, IjbPooling

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def protocol_paths(meta_dir: str | os.PathLike, target: str = "IJBC") -> tuple[Path, Path]:
    prefix = target.lower()
    if prefix not in ("ijbb", "ijbc"):
        raise ValueError(f"target={target!r} must be IJBB or IJBC (it names the protocol files)")
    meta = Path(meta_dir)
    paths = (meta / f"{prefix}_face_tid_mid.txt", meta / f"{prefix}_template_pair_label.txt")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"IJB protocol file {p} is missing; {meta} must hold {paths[0].name} "
                                    f"('<image> <template_id> <media_id>' lines) and {paths[1].name} "
                                    "('<t1> <t2> <label>' lines)")
    return paths


def _read_columns(path: Path, columns: int) -> list[list[str]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < columns:
                raise ValueError(f"{path}:{n}: expected {columns} columns, got {line.strip()!r}")
            rows.append(parts[:columns])
    if not rows:
        raise ValueError(f"{path} holds no records")
    return rows


def read_media_list(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """-> image names, template ids [N], media ids [N]."""
    rows = _read_columns(path, 3)
    try:
        templates = np.array([int(r[1]) for r in rows], np.int64)
        medias = np.array([int(r[2]) for r in rows], np.int64)
    except ValueError as err:
        raise ValueError(f"{path}: template and media ids must be integers ({err})") from None
    return [r[0] for r in rows], templates, medias


def read_pair_list(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> template 1 [P], template 2 [P], labels [P] (1 = same identity)."""
    try:
        arr = np.array([[int(x) for x in r] for r in _read_columns(path, 3)], np.int64)
    except ValueError as err:
        raise ValueError(f"{path}: pair lines must be three integers ({err})") from None
    if not np.isin(arr[:, 2], (0, 1)).all():
        raise ValueError(f"{path}: labels must be 0 or 1")
    return arr[:, 0], arr[:, 1], arr[:, 2]


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def read_face_list(meta_dir: str | os.PathLike, target: str, names: list[str], needed_for: str) -> list[FaceRecord]:
    """Every face-list image's 5 landmarks and detector score, from `<prefix>_name_5pts_score.txt`, checked to
    list the images `names` (the media list's) in the same order. `needed_for` ends the error of a missing file."""
    path = Path(meta_dir) / f"{target.lower()}_name_5pts_score.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {needed_for}")
    records = read_ijb_landmarks(path)
    check_same_images(names, [r.name for r in records], path)
    return records


def read_detector_scores(meta_dir: str | os.PathLike, target: str, names: list[str]) -> np.ndarray:
    """Detector score of each face-list image, from `<prefix>_name_5pts_score.txt` -> float32 [N]."""
    records = read_face_list(meta_dir, target, names, "pooling 'arcface_torch' weighs images by their detector "
                             "score; add the released file or use --pooling unit")
    return np.array([r.score for r in records], np.float32)


def check_same_images(names: list[str], listed: list[str], path: Path) -> None:
    """The face list and `path` must name the same images in the same order (eval_ijbc.py assumes it)."""
    if len(listed) != len(names):
        raise ValueError(f"{path} lists {len(listed)} images but the face list has {len(names)}; use the "
                         "meta files of one release")
    for n, (a, b) in enumerate(zip(names, listed, strict=True), 1):
        if a != b:
            raise ValueError(f"{path}:{n} names {b!r} where the face list names {a!r}; the two files must list "
                             "the same images in the same order")


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      pooling: IjbPooling = "unit", scores: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Template features (see the module's table): -> (sorted unique template ids [T], features [T, D])."""
    if len(features) != len(templates):
        raise ValueError(f"{len(features)} feature rows but the face list has {len(templates)} images")
    if pooling not in IJB_POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {', '.join(IJB_POOLINGS)}")
    feats = np.asarray(features, np.float32)  # float32 halves memory at IJB-C scale (469k images)
    if pooling == "unit":
        feats = _l2(feats)
    else:
        if scores is None or len(scores) != len(feats):
            raise ValueError("pooling 'arcface_torch' needs one detector score per feature row")
        feats = feats * np.asarray(scores, np.float32)[:, None]
    media_keys, media_of = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    media_of = media_of.reshape(-1)
    media_sum = np.zeros((len(media_keys), feats.shape[1]))
    np.add.at(media_sum, media_of, feats)
    media_mean = media_sum / np.bincount(media_of, minlength=len(media_keys))[:, None]
    template_ids, template_of = np.unique(media_keys[:, 0], return_inverse=True)
    template_sum = np.zeros((len(template_ids), feats.shape[1]))
    np.add.at(template_sum, template_of.reshape(-1), media_mean)
    # The mean over media (unit) and the sum (arcface_torch) differ only by a positive factor, which the
    # normalisation removes.
    return template_ids, _l2(template_sum)


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                chunk: int = 1 << 20) -> np.ndarray:
    """Cosine score of each template pair, in chunks (IJB-C has ~15.7M pairs)."""
    i1, i2 = np.searchsorted(template_ids, t1), np.searchsorted(template_ids, t2)
    for name, ids, idx in (("first", t1, i1), ("second", t2, i2)):
        found = (idx < len(template_ids)) & (template_ids[np.minimum(idx, len(template_ids) - 1)] == ids)
        if not found.all():
            raise ValueError(f"pair list names {int((~found).sum())} {name} templates absent from the face "
                             f"list (e.g. template {int(ids[~found][0])})")
    scores = np.empty(len(t1), np.float64)
    for s in range(0, len(t1), chunk):
        a, b = template_feats[i1[s:s + chunk]], template_feats[i2[s:s + chunk]]
        scores[s:s + chunk] = np.einsum("ij,ij->i", a, b)
    return scores


def tar_at_far(labels: np.ndarray, scores: np.ndarray, far_targets=FAR_TARGETS) -> dict[str, Any]:
    from sklearn.metrics import auc, roc_curve

    if labels.min() == labels.max():
        raise ValueError("TAR@FAR needs both genuine (label 1) and impostor (label 0) pairs")
    fpr, tpr, _ = roc_curve(labels, scores)
    tar = {}
    for far in far_targets:
        distance = np.abs(fpr - far)
        # the last of the nearest points: the top of a vertical step (tpr rises along the curve)
        tar[f"{far:.0e}"] = float(tpr[np.flatnonzero(distance == distance.min())[-1]])
    return {"tar_at_far": tar, "auc": float(auc(fpr, tpr)), "fpr": fpr, "tpr": tpr}


def align_features(features: np.ndarray, names: list[str], paths_file: Path | None) -> np.ndarray:
    """Reorder feature rows to the face list when the extraction wrote image paths; else use them as is."""
    if paths_file is None or not paths_file.is_file():
        return features
    paths = [line.rstrip("\n") for line in open(paths_file) if line.strip()]
    if len(paths) != len(features):
        raise ValueError(f"{paths_file} lists {len(paths)} images but the features hold {len(features)} rows")
    row_of = {os.path.basename(p): i for i, p in enumerate(paths)}
    missing = [n for n in names if os.path.basename(n) not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} images of the face list have no feature row (e.g. {missing[0]!r}); "
                         f"embed the whole image folder")
    return features[[row_of[os.path.basename(n)] for n in names]]


def evaluate_ijb(features: np.ndarray, meta_dir: str | os.PathLike, target: str = "IJBC",
                 paths_file: Path | None = None, pooling: IjbPooling = "unit",
                 scores: np.ndarray | None = None) -> dict[str, Any]:
    """Full 1:1 protocol: read the lists, build templates, score pairs, TAR at FAR 1e-6 ... 1e-1.

    `scores`: detector scores in face-list order for pooling 'arcface_torch' (default: read from
    `<prefix>_name_5pts_score.txt` in `meta_dir`).
    """
    media_path, pair_path = protocol_paths(meta_dir, target)
    names, templates, medias = read_media_list(media_path)
    feats = align_features(np.asarray(features), names, paths_file)
    if pooling == "arcface_torch" and scores is None:
        scores = read_detector_scores(meta_dir, target, names)
    ids, tfeats = template_features(feats, templates, medias, pooling, scores)
    t1, t2, labels = read_pair_list(pair_path)
    scores = pair_scores(ids, tfeats, t1, t2)
    result = tar_at_far(labels, scores)
    result.update(num_images=len(names), num_templates=len(ids), num_pairs=len(labels), target=target.upper(),
                  pooling=pooling)
    return result


def format_ijb(result: dict[str, Any]) -> list[str]:
    head = " | ".join(f"{k:>7}" for k in result["tar_at_far"])
    row = " | ".join(f"{100 * v:7.2f}" for v in result["tar_at_far"].values())
    return [f"{result['target']}: {result['num_templates']} templates, {result['num_pairs']} pairs, "
            f"AUC {100 * result['auc']:.2f}, pooling {result.get('pooling', 'unit')}", f"FAR  {head}", f"TAR  {row}"]
