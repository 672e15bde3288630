"""IJB template verification and 1:N identification on small synthetic protocol files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from megaface.eval import cli, ijb
from megaface.eval import identification as I


def _ijb_case(tmp_path, seed=0, identities=12, templates_per_id=3):
    """Face list + pair list; features = identity centre + noise; media hold 1-3 frames."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, 16))
    lines, feats, template_identity, media = [], [], {}, 100
    for ident in range(identities):
        for t in range(templates_per_id):
            tid = 1000 + ident * 10 + t
            template_identity[tid] = ident
            for _ in range(rng.integers(1, 4)):
                media += 1
                for _ in range(rng.integers(1, 4)):
                    lines.append(f"img/{len(lines)}.jpg {tid} {media}")
                    feats.append(centres[ident] + 0.8 * rng.normal(size=16))
    tids = sorted(template_identity)
    pairs = [(a, b, int(template_identity[a] == template_identity[b])) for i, a in enumerate(tids)
             for b in tids[i + 1:]]
    (tmp_path / "ijbc_face_tid_mid.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {l}\n" for a, b, l in pairs))
    return np.array(feats, np.float32), lines, pairs


def _naive_templates(feats, lines):
    by_template: dict[int, dict[int, list]] = {}
    for f, line in zip(feats, lines, strict=False):
        _, t, m = line.split()
        by_template.setdefault(int(t), {}).setdefault(int(m), []).append(f / np.linalg.norm(f))
    out = {}
    for t, medias in by_template.items():
        v = np.mean([np.mean(fs, 0) for fs in medias.values()], 0)
        out[t] = v / np.linalg.norm(v)
    return out


def test_templates_and_tar_match_naive(tmp_path):
    feats, lines, pairs = _ijb_case(tmp_path)
    result = ijb.evaluate_ijb(feats, tmp_path, "IJBC")
    naive = _naive_templates(feats, lines)
    scores = np.array([naive[a] @ naive[b] for a, b, _ in pairs])
    labels = np.array([l for _, _, l in pairs])
    fpr, tpr, _ = roc_curve(labels, scores)
    for far in ijb.FAR_TARGETS:
        distance = np.abs(fpr - far)  # among the nearest points (a vertical ROC step), the highest TAR
        assert result["tar_at_far"][f"{far:.0e}"] == pytest.approx(tpr[distance == distance.min()].max())
    assert result["num_templates"] == 36 and result["num_pairs"] == len(pairs)
    assert 0.5 < result["auc"] <= 1.0


def test_arcface_torch_pooling_matches_naive(tmp_path):
    """Image norm kept, times the detector score; media mean, template sum, L2 (eval_ijbc.py's N1 D1)."""
    feats, lines, pairs = _ijb_case(tmp_path, seed=2)
    scores = np.random.default_rng(3).uniform(0.3, 1.0, len(lines)).astype(np.float32)
    (tmp_path / "ijbc_name_5pts_score.txt").write_text(
        "".join(f"{l.split()[0]} {' '.join(['1'] * 10)} {s}\n" for l, s in zip(lines, scores, strict=False)))
    result = ijb.evaluate_ijb(feats, tmp_path, "IJBC", pooling="arcface_torch")
    by_template: dict[int, dict[int, list]] = {}
    for f, s, line in zip(feats, scores, lines, strict=False):
        _, t, m = line.split()
        by_template.setdefault(int(t), {}).setdefault(int(m), []).append(f * s)
    naive = {t: np.sum([np.mean(fs, 0) for fs in medias.values()], 0) for t, medias in by_template.items()}
    naive = {t: v / np.linalg.norm(v) for t, v in naive.items()}
    fpr, tpr, _ = roc_curve([l for _, _, l in pairs], [naive[a] @ naive[b] for a, b, _ in pairs])
    for far in ijb.FAR_TARGETS:
        distance = np.abs(fpr - far)
        assert result["tar_at_far"][f"{far:.0e}"] == pytest.approx(tpr[distance == distance.min()].max())
    templates = np.array([int(l.split()[1]) for l in lines])
    medias = np.array([int(l.split()[2]) for l in lines])
    ids, weighted = ijb.template_features(feats, templates, medias, "arcface_torch", scores)
    np.testing.assert_allclose(weighted, np.stack([naive[t] for t in ids]), rtol=1e-5, atol=1e-6)
    _, unit = ijb.template_features(feats, templates, medias, "unit")
    assert np.abs(unit - weighted).max() > 1e-2  # the score weighting changes the templates
    (tmp_path / "ijbc_name_5pts_score.txt").write_text("other.jpg " + " ".join(["1"] * 11) + "\n")
    with pytest.raises(ValueError, match="lists 1 images"):
        ijb.evaluate_ijb(feats, tmp_path, "IJBC", pooling="arcface_torch")


def test_ijb_cli_with_path_alignment(tmp_path):
    feats, lines, _ = _ijb_case(tmp_path, seed=1)
    order = np.random.default_rng(0).permutation(len(lines))  # rows in another order, with paths beside
    np.save(tmp_path / "feats.npy", feats[order])
    (tmp_path / "feats.paths.txt").write_text("".join(f"/data/{lines[i].split()[0]}\n" for i in order))
    report = tmp_path / "ijb.json"
    assert cli.main_ijb(["--features", str(tmp_path / "feats.npy"), "--meta-dir", str(tmp_path),
                         "--json", str(report), "--roc", str(tmp_path / "ijb.png")]) == 0
    expected = ijb.evaluate_ijb(feats, tmp_path, "IJBC")
    assert json.loads(report.read_text())["tar_at_far"] == expected["tar_at_far"]
    assert (tmp_path / "ijb.png").stat().st_size > 0


def test_ijb_bad_inputs(tmp_path):
    feats, _, _ = _ijb_case(tmp_path)
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid.txt"):
        ijb.evaluate_ijb(feats, tmp_path, "IJBB")
    with pytest.raises(ValueError, match="feature rows"):
        ijb.evaluate_ijb(feats[:-1], tmp_path, "IJBC")
    with open(tmp_path / "ijbc_template_pair_label.txt", "a") as f:
        f.write("1000 424242 0\n")
    with pytest.raises(ValueError, match="424242"):
        ijb.evaluate_ijb(feats, tmp_path, "IJBC")
    (tmp_path / "ijbc_template_pair_label.txt").write_text("1000 1001\n")
    with pytest.raises(ValueError, match="3 columns"):
        ijb.evaluate_ijb(feats, tmp_path, "IJBC")


def _ident_case(seed=0, ids=20, dim=12):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    gallery = centres + 0.5 * rng.normal(size=centres.shape)
    gallery_labels = np.arange(ids)
    probe_labels = np.repeat(np.arange(ids), 3)
    probe = centres[probe_labels] + 0.9 * rng.normal(size=(len(probe_labels), dim))
    distractors = rng.normal(size=(500, dim))
    return probe, probe_labels, gallery, gallery_labels, distractors


def _naive_ranks(probe, probe_labels, gallery, gallery_labels, distractors):
    n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cand = np.concatenate([n(gallery), n(distractors)])
    cand_labels = np.concatenate([gallery_labels, np.full(len(distractors), -1)])
    ranks = []
    for p, label in zip(n(probe), probe_labels, strict=False):
        s = cand @ p
        genuine = s[cand_labels == label].max()
        ranks.append(1 + int(np.sum((s > genuine) & (cand_labels != label))))
    return np.array(ranks)


def test_identification_matches_naive_in_small_blocks(tmp_path):
    probe, pl, gallery, gl, distractors = _ident_case()
    np.save(tmp_path / "d.npy", distractors.astype(np.float32))
    mm = np.load(tmp_path / "d.npy", mmap_mode="r")
    # tiny score blocks (the 256-row minimum); distractors come as two memory-mapped arrays
    result = I.identify(probe, pl, gallery, gl, [mm[:250], mm[250:]], max_rank=5, block_bytes=1024)
    naive = _naive_ranks(probe, pl, gallery, gl, distractors)
    assert result["ranks"].tolist() == naive.tolist()
    assert result["cmc"] == [float(np.mean(naive <= k)) for k in range(1, 6)]
    assert 0 < result["rank1"] < 1 and result["num_distractors"] == 500


def test_ident_cli_and_bad_inputs(tmp_path):
    probe, pl, gallery, gl, distractors = _ident_case(seed=1)
    for name, arr in (("probe", probe), ("gallery", gallery), ("probe.labels", pl), ("gallery.labels", gl),
                      ("distract", distractors)):
        np.save(tmp_path / f"{name}.npy", arr.astype(np.float32) if arr.ndim == 2 else arr)
    report = tmp_path / "ident.json"
    cli.main_ident(["--probe", str(tmp_path / "probe.npy"), "--gallery", str(tmp_path / "gallery.npy"),
                    "--distractors", str(tmp_path / "distract.npy"), "--json", str(report)])
    naive = _naive_ranks(probe, pl, gallery, gl, distractors)
    assert json.loads(report.read_text())["rank1"] == pytest.approx(float(np.mean(naive == 1)))
    with pytest.raises(ValueError, match="no gallery image"):
        I.identify(probe, pl, gallery[:5], gl[:5])
    with pytest.raises(ValueError, match="dimension"):
        I.identify(probe, pl, gallery, gl, [distractors[:, :5]])
    with pytest.raises(FileNotFoundError, match="labels"):
        cli.main_ident(["--probe", str(tmp_path / "distract.npy"), "--gallery", str(tmp_path / "gallery.npy")])
