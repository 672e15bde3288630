"""The verification protocol: vectorised code vs a plain loop reference, and known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import interpolate
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from megaface.eval import verification as V

# ---- an independent, deliberately naive reference of the protocol ------------------------------------

def _ref_rates(threshold, dist, same):
    pred = dist < threshold
    tp = np.sum(pred & same)
    fp = np.sum(pred & ~same)
    tn = np.sum(~pred & ~same)
    fn = np.sum(~pred & same)
    tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def _ref_val_far(threshold, dist, same):
    pred = dist < threshold
    return (float(np.sum(pred & same)) / float(np.sum(same)),
            float(np.sum(pred & ~same)) / float(np.sum(~same)))


def reference(emb, emb_flip, issame, folds=10):
    """Loop per fold and per threshold, like the original verification code."""
    issame = np.asarray(issame)
    e = normalize(emb.astype(np.float64) + emb_flip.astype(np.float64))
    dist = np.sum(np.square(e[0::2] - e[1::2]), 1)
    splits = list(KFold(n_splits=folds, shuffle=False).split(np.arange(len(dist))))
    thr = np.arange(0, 4, 0.01)
    acc = np.zeros(folds)
    for f, (tr, te) in enumerate(splits):
        acc_train = np.array([_ref_rates(t, dist[tr], issame[tr])[2] for t in thr])
        acc[f] = _ref_rates(thr[np.argmax(acc_train)], dist[te], issame[te])[2]
    thr = np.arange(0, 4, 0.001)
    val, far = np.zeros(folds), np.zeros(folds)
    for f, (tr, te) in enumerate(splits):
        far_train = np.array([_ref_val_far(t, dist[tr], issame[tr])[1] for t in thr])
        if far_train.max() >= 1e-3:
            # "slinear" refuses repeated FARs on current SciPy; "linear" draws the same segments
            threshold = interpolate.interp1d(far_train, thr, kind="linear")(1e-3)
        else:
            threshold = 0.0
        val[f], far[f] = _ref_val_far(threshold, dist[te], issame[te])
    xn = [np.linalg.norm(row) for row in np.concatenate([emb, emb_flip]).astype(np.float64)]
    return {"accuracy": np.mean(acc), "std": np.std(acc), "accuracies": acc, "xnorm": sum(xn) / len(xn),
            "val": np.mean(val), "val_std": np.std(val), "far": np.mean(far)}


def _random_case(pairs, dim, seed, noise):
    """Identity centres + noise; LFW-like layout: blocks of same pairs then different pairs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4 * pairs, dim))
    issame = (np.arange(pairs) // max(pairs // 20, 1)) % 2 == 0
    emb = np.zeros((2 * pairs, dim), np.float32)
    for i in range(pairs):
        a, b = centres[2 * i], centres[2 * i if issame[i] else 2 * i + 1]
        emb[2 * i] = a + noise * rng.normal(size=dim)
        emb[2 * i + 1] = b + noise * rng.normal(size=dim)
    flip = (emb + 0.3 * noise * rng.normal(size=emb.shape)).astype(np.float32)
    return emb * 10, flip * 10, issame


@pytest.mark.parametrize("pairs,dim,seed,noise", [(600, 16, 0, 1.0), (610, 8, 1, 1.4), (6000, 128, 2, 1.2)])
def test_matches_loop_reference(pairs, dim, seed, noise):
    emb, flip, issame = _random_case(pairs, dim, seed, noise)
    got = V.evaluate(emb, flip, issame)
    ref = reference(emb, flip, issame)
    assert 0.5 < got["accuracy"] < 1.0  # a non-trivial case
    for key in ("accuracy", "std", "val", "val_std", "far"):
        assert got[key] == ref[key], key
    assert got["accuracies"] == ref["accuracies"].tolist()
    assert got["xnorm"] == pytest.approx(ref["xnorm"], rel=1e-13)
    assert V.format_result("x", got) == V.format_result("x", {**ref, "embedding_shape": emb.shape})


def test_unstructured_random_embeddings_match():
    rng = np.random.default_rng(5)
    emb, flip = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
    issame = rng.random(200) < 0.5
    got, ref = V.evaluate(emb, flip, issame), reference(emb, flip, issame)
    assert (got["accuracy"], got["std"], got["val"], got["far"]) == (ref["accuracy"], ref["std"], ref["val"],
                                                                      ref["far"])


def _pairs_with_distances(kinds):
    """2-D unit vectors: 'same' -> dist 0, 'diff' -> dist 2 (orthogonal), 'wrong' -> same pair at dist 4."""
    second = {"same": (1.0, 0.0), "diff": (0.0, 1.0), "wrong": (-1.0, 0.0)}
    emb = np.zeros((2 * len(kinds), 2))
    emb[0::2] = (1.0, 0.0)
    emb[1::2] = [second[k] for k in kinds]
    return emb, np.array([k != "diff" for k in kinds])


def test_perfect_separation():
    emb, issame = _pairs_with_distances(["same", "diff"] * 300)
    r = V.evaluate(emb * 3, emb * 3, issame)
    assert (r["accuracy"], r["std"], r["accuracy_noflip"]) == (1.0, 0.0, 1.0)
    assert r["fold_thresholds"] == [0.01] * 10  # first maximum wins among all perfect thresholds
    assert r["threshold"] == 0.01
    assert r["xnorm"] == pytest.approx(3.0)
    # FAR jumps 0 -> 1 at the distance-2 cliff; interpolating to 1e-3 lands just past it (protocol artefact)
    ref = reference(emb * 3, emb * 3, issame)
    assert (r["val"], r["far"]) == (ref["val"], ref["far"]) == (1.0, 1.0)


def test_known_mistake_rate():
    kinds = ["same", "diff"] * 3000  # 6,000 pairs, 600 per fold
    for fold in range(10):  # fold f gets f same pairs pushed to distance 4 (unfixable mistakes)
        for j in range(fold):
            kinds[fold * 600 + 2 * j] = "wrong"
    emb, issame = _pairs_with_distances(kinds)
    r = V.evaluate(emb, emb, issame)
    expected = np.array([1 - f / 600 for f in range(10)])
    assert r["accuracies"] == expected.tolist()
    assert r["accuracy"] == np.mean(expected) and r["std"] == np.std(expected)
    assert r["accuracy"] == pytest.approx(1 - 4.5 / 600)


def test_tie_at_threshold_is_predicted_different():
    thr = V.ACC_THRESHOLDS
    dist = np.where(np.arange(100) % 2 == 0, thr[100], 3.0)  # same pairs exactly at threshold 1.00
    issame = np.arange(100) % 2 == 0
    roc = V.calculate_roc(dist, issame, nrof_folds=10)
    # dist < t is strict: t = 1.00 rejects the same pairs, the first perfect threshold is the next one
    assert np.all(roc["fold_thresholds"] == thr[101])
    assert np.all(roc["accuracy"] == 1.0)


def test_equal_accuracy_thresholds_take_the_first():
    dist = np.array([0.5, 0.5, 0.5, 0.5])
    issame = np.array([True, False, True, False])
    roc = V.calculate_roc(dist, issame, nrof_folds=1)
    assert roc["fold_thresholds"][0] == 0.0  # every threshold scores 0.5; index 0 wins


@pytest.mark.parametrize("pairs", [6000, 7000, 6003, 25])
def test_fold_layout_matches_kfold(pairs):
    expected = [(int(te[0]), int(te[-1]) + 1) for _, te in KFold(10, shuffle=False).split(np.arange(pairs))]
    assert V.fold_bounds(pairs, 10) == expected
    if pairs in (6000, 7000):
        assert {stop - start for start, stop in expected} == {pairs // 10}


def test_far_to_threshold_matches_slinear_when_fars_are_distinct():
    rng = np.random.default_rng(0)
    far = np.sort(rng.random(50))
    thr = np.arange(50) * 0.001
    for target in (far[3], (far[10] + far[11]) / 2, far[0] + 1e-9, far[-1]):
        ref = float(interpolate.interp1d(far, thr, kind="slinear")(target))
        assert V.far_to_threshold(far, thr, target) == pytest.approx(ref, abs=1e-15)


def test_far_to_threshold_with_repeated_fars():
    far = np.array([0.0, 0.0, 0.0, 0.0005, 0.0005, 0.002, 0.002, 0.004])
    thr = np.arange(len(far)) * 0.001
    with pytest.raises(ValueError):  # why the original call cannot be used as is
        interpolate.interp1d(far, thr, kind="slinear")
    # between distinct FARs: the segment from the last threshold at the lower FAR to the first at the upper
    assert V.far_to_threshold(far, thr, 0.00125) == pytest.approx(0.004 + 0.001 * 0.5)
    # an exact hit: the largest threshold still at that FAR
    assert V.far_to_threshold(far, thr, 0.002) == pytest.approx(0.006)
    assert V.far_to_threshold(far, thr, 0.0005) == pytest.approx(0.004)
    for target in (0.00125, 0.0003, 0.003):
        assert V.far_to_threshold(far, thr, target) == pytest.approx(float(np.interp(target, far, thr)))


def test_val_with_repeated_training_fars_is_finite_and_matches_reference():
    # Few negatives: the training FAR curve is a staircase with long flat runs.
    emb, flip, issame = _random_case(300, 8, 3, 1.1)
    got, ref = V.evaluate(emb, flip, issame), reference(emb, flip, issame)
    assert np.isfinite(got["val"]) and (got["val"], got["val_std"], got["far"]) == (ref["val"], ref["val_std"],
                                                                                    ref["far"])


def test_seed_lines_format():
    result = {"embedding_shape": (12000, 512), "xnorm": 21.8997054, "accuracy": 0.9971666, "std": 0.0030777}
    assert V.format_result("lfw", result) == [
        "Validation on [lfw]:", "Embedding shape: (12000, 512)", "XNorm: 21.899705",
        "Accuracy-Flip: 0.99717+-0.00308"]


def test_noflip_and_none_flip():
    emb, flip, issame = _random_case(200, 8, 4, 1.2)
    r = V.evaluate(emb, None, issame)
    assert r["accuracy"] == r["accuracy_noflip"]
    assert r["xnorm"] == pytest.approx(np.linalg.norm(emb.astype(np.float64), axis=1).mean())
    r2 = V.evaluate(emb, flip, issame)
    assert r2["accuracy_noflip"] == r["accuracy"]


@pytest.mark.parametrize("rows,flags,match", [(7, 3, "odd"), (8, 3, "issame"), (8, 5, "issame")])
def test_bad_shapes(rows, flags, match):
    with pytest.raises(ValueError, match=match):
        V.evaluate(np.ones((rows, 4)), None, [True] * flags)


def test_bad_values():
    emb = np.ones((20, 4))
    emb[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        V.evaluate(emb, None, [True] * 10)
    with pytest.raises(ValueError, match="flipped"):
        V.evaluate(np.ones((20, 4)), np.ones((20, 5)), [True] * 10)
    with pytest.raises(ValueError, match="nrof_folds"):
        V.evaluate(np.ones((20, 4)), None, [True] * 10, nrof_folds=11)
