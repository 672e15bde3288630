"""`megaface eval-ijb --checkpoint --ijb-dir`: an IJB-shaped folder of loose synthetic crops, end to end.

The reference test runs arcface_torch's own eval_ijbc.py (tests/support/ijb_reference.py says what it patches) with the
same weights on the same folder and requires megaface's printed TAR@FAR digits to equal its table's. It needs
MEGAFACE_ARCFACE_TORCH (recognition/arcface_torch of an InsightFace checkout) and an interpreter with pandas,
scikit-image, prettytable and matplotlib besides megaface's dependencies: MEGAFACE_IJB_PYTHON (default: this one).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from megaface import cli
from megaface.data.align import align_face, read_ijb_landmarks
from megaface.data.decode import decode_image, normalize_batch
from megaface.eval import cli as eval_cli
from megaface.eval import ijb
from megaface.models import build_model
from tests.conftest import run_distributed
from tests.support.ijb_fixtures import write_ijb

ARCFACE_TORCH = os.environ.get("MEGAFACE_ARCFACE_TORCH")
REFERENCE_PYTHON = os.environ.get("MEGAFACE_IJB_PYTHON", sys.executable)
REPO = Path(__file__).resolve().parents[2]
NETWORK = "mobilefacenet_tiny"


def _megaface_run(root: Path, identities: int, templates_per_id: int, variants: int | None = None) -> dict:
    """The IJB folder, a 512-d checkpoint (eval_ijbc.py's feature buffer is 2 x 512 wide), megaface's run."""
    counts = write_ijb(root / "IJBC", identities=identities, templates_per_id=templates_per_id, variants=variants)
    torch.manual_seed(0)
    ckpt = root / "backbone.pt"
    torch.save(build_model(NETWORK, embedding_size=512).state_dict(), ckpt)
    (root / "backbone.pt.json").write_text(json.dumps({"network": NETWORK, "embedding_size": 512}))
    argv = ["eval-ijb", "--checkpoint", str(ckpt), "--ijb-dir", str(root / "IJBC"), "--target", "IJBC",
            "--batch-size", "16", "--json", str(root / "ijb.json"), "--roc", str(root / "roc.png"),
            "--save-features", str(root / "feats.npy")]
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "ckpt": ckpt, "stdout": out.getvalue(), "stderr": err.getvalue(), "counts": counts}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _megaface_run(tmp_path_factory.mktemp("ijb"), identities=4, templates_per_id=2)  # quick: plumbing


@pytest.fixture(scope="module")
def larger_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # 2 face variants per identity: an untrained network separates them, so the ROC starts with a vertical
    # step at FAR 0 and the low-FAR cells test which point of a step is read (the top one, as eval_ijbc.py)
    return _megaface_run(tmp_path_factory.mktemp("ijb_ref"), identities=8, templates_per_id=3, variants=2)


def test_eval_ijb_from_loose_crops(run: dict) -> None:
    root, counts = run["root"], run["counts"]
    report = json.loads((root / "ijb.json").read_text())
    assert report["pooling"] == "arcface_torch" and report["num_templates"] == counts["templates"]
    assert report["num_pairs"] == counts["pairs"] and (root / "roc.png").stat().st_size > 0
    assert re.search(r"^TAR(\s+\|?\s*\d+\.\d\d){6}$", run["stdout"], re.M), run["stdout"]
    n = counts["images"]  # not a terminal: one plain progress line at the end, no bar
    assert f"eval-ijb IJBC: {n}/{n} faces" in run["stderr"] and "\r" not in run["stderr"], run["stderr"]

    # the saved features: each row is emb(aligned crop) + emb(its mirror image), computed here directly
    feats = np.load(root / "feats.npy")
    records = read_ijb_landmarks(root / "IJBC" / "meta" / "ijbc_name_5pts_score.txt")
    assert feats.shape == (counts["images"], 512)
    model = build_model(NETWORK, embedding_size=512)
    model.load_state_dict(torch.load(run["ckpt"]))
    model.eval()
    for i in (0, len(records) - 1):
        crop = align_face(decode_image((root / "IJBC" / "loose_crop" / records[i].name).read_bytes()),
                          records[i].landmarks)
        with torch.no_grad():
            emb = model(normalize_batch(np.stack([crop, crop[:, ::-1]])))
        np.testing.assert_allclose(feats[i], (emb[0] + emb[1]).numpy(), rtol=1e-4, atol=1e-4)

    # scoring the saved features again gives the same numbers
    again = ijb.evaluate_ijb(feats, root / "IJBC" / "meta", "IJBC", root / "feats.paths.txt", "arcface_torch")
    assert again["tar_at_far"] == report["tar_at_far"]


def _ijb_on_rank(state: object, argv: list[str]) -> str:
    torch.set_num_threads(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        eval_cli.main_ijb(argv)
    return out.getvalue()


def test_eval_ijb_on_two_ranks_equals_one(run: dict, tmp_path: Path) -> None:
    """Each rank aligns and embeds its share; rank 0 gathers, scores and writes; the result is the 1-rank one."""
    root = run["root"]
    argv = ["--checkpoint", str(run["ckpt"]), "--ijb-dir", str(root / "IJBC"), "--batch-size", "4",
            "--save-features", str(tmp_path / "feats.npy"), "--progress", "off"]
    outputs = run_distributed(_ijb_on_rank, 2, argv, timeout=300)
    assert outputs[1] == ""  # only rank 0 reports
    tar = [line for line in outputs[0].splitlines() if line.startswith("TAR")]
    assert tar == [line for line in run["stdout"].splitlines() if line.startswith("TAR")], outputs[0]
    np.testing.assert_allclose(np.load(tmp_path / "feats.npy"), np.load(root / "feats.npy"), rtol=1e-4, atol=1e-4)


def test_eval_ijb_bad_layouts(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["eval-ijb", "--checkpoint", str(run["ckpt"])]
    assert cli.main(base) == 2 and "--ijb-dir" in capsys.readouterr().err
    assert cli.main([*base, "--ijb-dir", str(tmp_path)]) == 2
    assert "loose_crop/" in capsys.readouterr().err
    write_ijb(tmp_path / "IJBB", identities=2, templates_per_id=1, target="IJBB")
    meta = tmp_path / "IJBB" / "meta" / "ijbb_name_5pts_score.txt"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join(lines[::-1]) + "\n")  # another order than the face list
    assert cli.main([*base, "--ijb-dir", str(tmp_path / "IJBB"), "--target", "IJBB"]) == 2
    assert "same images in the same order" in capsys.readouterr().err


def _reference_ready() -> str | None:
    if not ARCFACE_TORCH:
        return "set MEGAFACE_ARCFACE_TORCH to InsightFace's recognition/arcface_torch to compare with its eval_ijbc.py"
    probe = subprocess.run([REFERENCE_PYTHON, "-c", "import pandas, skimage, prettytable, matplotlib, sklearn"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return (f"eval_ijbc.py needs pandas, scikit-image, prettytable and matplotlib in {REFERENCE_PYTHON} "
                f"(set MEGAFACE_IJB_PYTHON to an interpreter that has them): {probe.stderr.strip().splitlines()[-1]}")
    return None


REFERENCE_MISSING = _reference_ready()


@pytest.mark.skipif(REFERENCE_MISSING is not None, reason=str(REFERENCE_MISSING))
def test_tar_at_far_equals_arcface_torch_eval_ijbc(larger_run: dict) -> None:
    run = larger_run
    root = run["root"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([REFERENCE_PYTHON, str(REPO / "tests" / "support" / "ijb_reference.py"), ARCFACE_TORCH,
                           str(root / "IJBC"), "IJBC", str(run["ckpt"]), NETWORK, str(root / "ref"), "16"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ijbc-IJBC")]
    assert len(table) == 1, done.stdout[-3000:]
    reference_digits = [cell.strip() for cell in table[0].strip("|").split("|")[1:]]
    ours = [line for line in run["stdout"].splitlines() if line.startswith("TAR")]
    our_digits = [cell.strip() for cell in ours[0][len("TAR"):].split("|")]
    assert our_digits == reference_digits, (run["stdout"], done.stdout[-1500:])
    assert len(set(reference_digits)) > 1, reference_digits  # a table of one repeated value would prove little

    # and pair by pair: eval_ijbc.py's saved scores against megaface's from the saved features
    meta = root / "IJBC" / "meta"
    names, templates, medias = ijb.read_media_list(meta / "ijbc_face_tid_mid.txt")
    scores = ijb.read_detector_scores(meta, "IJBC", names)
    ids, feats = ijb.template_features(np.load(root / "feats.npy"), templates, medias, "arcface_torch", scores)
    t1, t2, labels = ijb.read_pair_list(meta / "ijbc_template_pair_label.txt")
    pair_scores = ijb.pair_scores(ids, feats, t1, t2)
    np.testing.assert_allclose(pair_scores, np.load(root / "ref" / "reference" / "ijbc.npy"), rtol=0, atol=1e-4)
    fpr, tpr, _ = roc_curve(labels, pair_scores)
    lowest = [f"{100 * tpr[np.argmin(np.abs(fpr - far))]:.2f}" for far in ijb.FAR_TARGETS]
    assert lowest != reference_digits  # this set has vertical ROC steps at the targets: the tie rule is tested


def test_eval_ijb_draws_a_bar_on_a_terminal(run: dict, tmp_path: Path) -> None:
    from tests.conftest import run_under_pty

    root = run["root"]
    rc, out = run_under_pty([sys.executable, "-m", "megaface", "eval-ijb", "--checkpoint", str(run["ckpt"]),
                             "--ijb-dir", str(root / "IJBC"), "--target", "IJBC", "--batch-size", "16"],
                            env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=240)
    n = run["counts"]["images"]
    assert rc == 0 and "eval-ijb IJBC: 100%|" in out and f"{n}/{n}" in out and "\r" in out, out[-3000:]
    assert "done in" not in out, out[-3000:]  # no plain progress lines on a terminal
