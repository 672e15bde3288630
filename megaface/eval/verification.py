"""The verification protocol behind "Accuracy-Flip" and "XNorm" (LFW, CFP-FP, AgeDB-30, ...).

Pure numpy + scikit-learn; no process group. Given the same embeddings it reproduces the numbers of
InsightFace's verification code:

1. XNorm = mean L2 norm of all raw embeddings (both copies when a flipped copy is given).
2. e = l2_normalize(emb + emb_flipped) in float64; pairs are rows (0, 1), (2, 3), ...;
   dist = sum((e_a - e_b)^2), in [0, 4].
3. Pairs are cut into `nrof_folds` contiguous folds (scikit-learn's `KFold(shuffle=False)` layout: the first
   P % k folds hold one extra pair). Thresholds `arange(0, 4, 0.01)`; for each fold the threshold with the
   best accuracy on the other folds is chosen (first maximum wins), "same" is predicted where
   `dist < threshold`, and the held-out fold is scored. Reported: mean and population std of the fold
   accuracies.
4. VAL@FAR=1e-3: thresholds `arange(0, 4, 0.001)`; on the training folds the FAR curve is inverted to a
   threshold by linear interpolation, then VAL and FAR are measured on the held-out fold.

Instead of one pass over the data per threshold, each fold's distances are sorted once and the counts
below every threshold come from `searchsorted(side="left")` (= number of distances strictly below it),
so the integer confusion counts, and therefore every reported number, are identical to the loop.

FAR inversion. InsightFace calls `scipy.interpolate.interp1d(far, thresholds, kind="slinear")`, which
current SciPy refuses whenever two thresholds give the same training FAR (always the case at small
thresholds, where FAR is 0). `far_to_threshold` defines the inversion for any non-decreasing FAR curve:
with `hi` the first threshold whose FAR exceeds the target and `lo = hi - 1` (the last whose FAR is <= it),
an exact hit returns the largest threshold reaching the target FAR, otherwise the point on the segment
lo-hi. Where the FARs are distinct this is the same line segment SciPy's "slinear" interpolates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.preprocessing import normalize as _l2_normalize

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


def fold_bounds(num_pairs: int, nrof_folds: int) -> list[tuple[int, int]]:
    """[start, stop) of each contiguous fold, as scikit-learn's KFold(n_splits, shuffle=False) cuts them.

    `nrof_folds=1` means "train and test on everything" (InsightFace's single-fold convention).
    """
    if nrof_folds < 1 or nrof_folds > num_pairs:
        raise ValueError(f"nrof_folds={nrof_folds} must be between 1 and the number of pairs ({num_pairs})")
    if nrof_folds == 1:
        return [(0, num_pairs)]
    base, extra = divmod(num_pairs, nrof_folds)
    bounds, start = [], 0
    for f in range(nrof_folds):
        stop = start + base + (1 if f < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of rows (0, 1), (2, 3), ... of already-normalised embeddings."""
    diff = np.subtract(embeddings[0::2], embeddings[1::2])
    return np.sum(np.square(diff), 1)


def _fold_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray,
                 bounds: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Per fold and threshold: true accepts (same, dist < t), false accepts, and the class sizes."""
    k, t = len(bounds), len(thresholds)
    tp, fp = np.zeros((k, t), np.int64), np.zeros((k, t), np.int64)
    n_same, n_diff = np.zeros(k, np.int64), np.zeros(k, np.int64)
    for f, (start, stop) in enumerate(bounds):
        d, s = dist[start:stop], issame[start:stop]
        same_sorted, diff_sorted = np.sort(d[s]), np.sort(d[~s])
        tp[f] = np.searchsorted(same_sorted, thresholds, side="left")
        fp[f] = np.searchsorted(diff_sorted, thresholds, side="left")
        n_same[f], n_diff[f] = len(same_sorted), len(diff_sorted)
    return {"tp": tp, "fp": fp, "n_same": n_same, "n_diff": n_diff}


def _safe_rate(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # InsightFace's ROC uses 0 for an empty class; the same rule is applied everywhere here.
    den = np.broadcast_to(den, num.shape)
    out = np.zeros(num.shape, np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def calculate_roc(dist: np.ndarray, issame: np.ndarray, nrof_folds: int = 10,
                  thresholds: np.ndarray = ACC_THRESHOLDS) -> dict[str, Any]:
    """Cross-validated accuracy: per-fold accuracies, chosen thresholds and the mean test-fold ROC."""
    bounds = fold_bounds(len(dist), nrof_folds)
    c = _fold_counts(dist, issame, thresholds, bounds)
    # correct = tp + tn, with tn = negatives at or above the threshold
    correct = c["tp"] + (c["n_diff"][:, None] - c["fp"])
    train_correct = correct.sum(0)[None, :] - correct if nrof_folds > 1 else correct
    best = np.argmax(train_correct, axis=1)  # first maximum wins, as np.argmax does
    sizes = np.array([stop - start for start, stop in bounds], np.float64)
    accuracy = correct[np.arange(len(bounds)), best] / sizes
    tpr = _safe_rate(c["tp"], c["n_same"][:, None]).mean(0)
    fpr = _safe_rate(c["fp"], c["n_diff"][:, None]).mean(0)
    return {"accuracy": accuracy, "fold_thresholds": thresholds[best], "tpr": tpr, "fpr": fpr}


def far_to_threshold(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Threshold at which a non-decreasing FAR curve reaches `far_target` (see the module docstring)."""
    if far_target <= far[0]:
        return float(thresholds[0])
    hi = int(np.searchsorted(far, far_target, side="right"))
    lo = hi - 1
    if hi == len(far) or far[lo] == far_target:
        return float(thresholds[lo])
    frac = (far_target - far[lo]) / (far[hi] - far[lo])
    return float(thresholds[lo] + (thresholds[hi] - thresholds[lo]) * frac)


def calculate_val(dist: np.ndarray, issame: np.ndarray, nrof_folds: int = 10, far_target: float = FAR_TARGET,
                  thresholds: np.ndarray = VAL_THRESHOLDS) -> dict[str, Any]:
    """VAL (true accept rate) at a training-fold FAR of `far_target`: mean, population std, achieved FAR."""
    bounds = fold_bounds(len(dist), nrof_folds)
    c = _fold_counts(dist, issame, thresholds, bounds)
    val, far = np.zeros(len(bounds)), np.zeros(len(bounds))
    for f, (start, stop) in enumerate(bounds):
        if nrof_folds > 1:
            fp_train, n_diff_train = c["fp"].sum(0) - c["fp"][f], c["n_diff"].sum() - c["n_diff"][f]
        else:
            fp_train, n_diff_train = c["fp"][f], c["n_diff"][f]
        far_train = _safe_rate(fp_train, np.asarray(n_diff_train))
        threshold = far_to_threshold(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
        d, s = dist[start:stop], issame[start:stop]
        accept = d < threshold
        val[f] = _safe_rate(np.sum(accept & s), np.asarray(np.sum(s)))
        far[f] = _safe_rate(np.sum(accept & ~s), np.asarray(np.sum(~s)))
    return {"val": float(np.mean(val)), "val_std": float(np.std(val)), "far": float(np.mean(far))}


def _check_inputs(embeddings: np.ndarray, flipped: np.ndarray | None, issame: np.ndarray) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [2P, D] array, got shape {embeddings.shape}")
    n = embeddings.shape[0]
    if n % 2:
        raise ValueError(f"embeddings hold {n} rows, an odd count: pairs need rows (0, 1), (2, 3), ...")
    if issame.ndim != 1 or len(issame) != n // 2:
        raise ValueError(f"issame has {issame.shape} entries but the {n} embeddings form {n // 2} pairs")
    if flipped is not None and flipped.shape != embeddings.shape:
        raise ValueError(f"flipped_embeddings shape {flipped.shape} differs from embeddings {embeddings.shape}")
    for name, arr in (("embeddings", embeddings), ("flipped_embeddings", flipped)):
        if arr is not None and not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contain NaN or infinite values (diverged model or bad input)")


def xnorm(*arrays: np.ndarray) -> float:
    """Mean L2 norm over the rows of all arrays, accumulated in order like a running sum."""
    norms = np.concatenate([np.sqrt(np.einsum("ij,ij->i", a, a)) for a in arrays])
    return float(np.cumsum(norms)[-1] / len(norms))


def _protocol(normalized: np.ndarray, issame: np.ndarray, nrof_folds: int) -> tuple[dict, dict, np.ndarray]:
    dist = pair_distances(normalized)
    return calculate_roc(dist, issame, nrof_folds), calculate_val(dist, issame, nrof_folds), dist


def evaluate(embeddings: np.ndarray, flipped_embeddings: np.ndarray | None, issame: Any,
             nrof_folds: int = 10) -> dict[str, Any]:
    """Score one verification pack; `embeddings[2i]`, `embeddings[2i+1]` form pair i.

    Returns accuracy / std (Accuracy-Flip mean and population std; plain accuracy when
    `flipped_embeddings` is None), xnorm, accuracy_noflip / std_noflip, threshold (chosen on all pairs, first
    maximum), fold_thresholds, accuracies (per fold), val, val_std, far (VAL@FAR=1e-3 of the fused
    embeddings), tpr / fpr (mean test-fold ROC over `ACC_THRESHOLDS`), num_pairs, embedding_shape.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    flipped = None if flipped_embeddings is None else np.asarray(flipped_embeddings, dtype=np.float64)
    same = np.asarray(issame, dtype=bool)
    _check_inputs(emb, flipped, same)
    fused = _l2_normalize(emb + flipped) if flipped is not None else _l2_normalize(emb)
    roc, val, dist = _protocol(fused, same, nrof_folds)
    if flipped is not None:
        roc_noflip = calculate_roc(pair_distances(_l2_normalize(emb)), same, nrof_folds)
    else:
        roc_noflip = roc
    whole = calculate_roc(dist, same, 1)
    return {
        "accuracy": float(np.mean(roc["accuracy"])),
        "std": float(np.std(roc["accuracy"])),
        "xnorm": xnorm(emb) if flipped is None else xnorm(emb, flipped),
        "accuracy_noflip": float(np.mean(roc_noflip["accuracy"])),
        "std_noflip": float(np.std(roc_noflip["accuracy"])),
        "threshold": float(whole["fold_thresholds"][0]),
        "fold_thresholds": roc["fold_thresholds"].tolist(),
        "accuracies": roc["accuracy"].tolist(),
        **val,
        "tpr": roc["tpr"],
        "fpr": roc["fpr"],
        "num_pairs": int(len(same)),
        "embedding_shape": tuple(emb.shape),
    }


def format_result(name: str, result: dict[str, Any]) -> list[str]:
    """The seed's four log lines for one pack (the shape is the fused embeddings' [2P, D])."""
    rows, dim = result["embedding_shape"]
    return [
        f"Validation on [{name}]:",
        f"Embedding shape: ({rows}, {dim})",
        "XNorm: %f" % result["xnorm"],
        "Accuracy-Flip: %1.5f+-%1.5f" % (result["accuracy"], result["std"]),
    ]


def json_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a result (drops the ROC arrays)."""
    keep = ("accuracy", "std", "xnorm", "accuracy_noflip", "std_noflip", "threshold", "fold_thresholds",
            "accuracies", "val", "val_std", "far", "num_pairs")
    out = {k: result[k] for k in keep if k in result}
    out["embedding_shape"] = list(result["embedding_shape"])
    return out
