"""`megaface clean` end to end: a K = 3 model trained on 2 ranks (FC7 sharded) on a noisy synthetic pack, cleaned,
checked against a reference written here from the definition (sub-center ArcFace, Deng et al. 2020), read back,
and retrained with K = 1."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import cv2
import deepspeed  # noqa: F401  - imported before forking so that each rank starts in about a second
import numpy as np
import pytest
import torch

from megaface import cli
from tests.conftest import run_distributed, tiny_args, train_worker

IDENTITIES, IMAGES, K = 20, 6, 3


def _records(pack_dir: Path) -> list[tuple[int, bytes]]:
    from megaface.data import open_pack

    pack = open_pack(pack_dir)
    return [pack[i] for i in range(len(pack))]


def _reference(tag_dir: Path, records: list[tuple[int, bytes]]) -> np.ndarray:
    """Angles (degrees) of each record to its class's dominant sub-center, from the definition."""
    from megaface.checkpoint import load_backbone

    model, _ = load_backbone(tag_dir)
    rgb = np.stack([cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                    for _, b in records])
    x = (torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # arcface_torch normalisation
    with torch.no_grad():
        emb = model(x).double().numpy()
    shards = [torch.load(p, weights_only=True) for p in sorted((tag_dir / "fc7").glob("shard_*.pt"))]
    assert len(shards) == 2 and all(s["subcenters"] == K for s in shards)
    weight = torch.cat([s["weight"] for s in sorted(shards, key=lambda s: s["class_start"])]).double().numpy()
    labels = np.array([lab for lab, _ in records])
    angles = np.empty(len(records))
    for c in range(IDENTITIES):
        rows = weight[c * K:(c + 1) * K]
        members = np.flatnonzero(labels == c)
        cos = np.array([[e @ r / (np.linalg.norm(e) * np.linalg.norm(r)) for r in rows] for e in emb[members]])
        dominant = np.bincount(cos.argmax(axis=1), minlength=K).argmax()
        angles[members] = np.degrees(np.arccos(np.clip(cos[:, dominant], -1, 1)))
    return angles


def _choose(angles: np.ndarray, labels: np.ndarray) -> tuple[float, int, np.ndarray]:
    """A threshold in the widest gap of the middle of the angles and a min_images that drops the classes left
    smallest: both reasons fire. Returns them and the expected kept mask."""
    a = np.sort(angles)
    lo, hi = len(a) // 3, 2 * len(a) // 3
    j = lo + int(np.argmax(np.diff(a[lo:hi + 1])))
    threshold = float((a[j] + a[j + 1]) / 2)
    assert a[j + 1] - a[j] > 1e-3, "no clear gap to put the threshold in"
    near = angles <= threshold
    left = np.bincount(labels[near], minlength=IDENTITIES)
    min_images = int(np.unique(left[left > 0])[1])  # the second smallest count: the smallest classes go
    return threshold, min_images, near & (left[labels] >= min_images)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from megaface.data.synthetic import write_synthetic
    from megaface.data.synthetic_noise import SyntheticNoise

    root = tmp_path_factory.mktemp("clean")
    pack = root / "noisy"
    write_synthetic(pack, IDENTITIES, IMAGES, val_pairs=10, seed=3, noise=SyntheticNoise(0.15, 0.2))
    argv = tiny_args(root, root / "k3", 4, "--data.source=recordio", f"--data.path={pack}",
                     f"--head.subcenters={K}", "--head.scale=16")
    assert [r["code"] for r in run_distributed(train_worker, 2, argv)] == [0, 0]
    tag_dir = root / "k3" / "checkpoints" / "step_00000004"
    records = _records(pack)
    labels = np.array([lab for lab, _ in records])
    angles = _reference(tag_dir, records)
    threshold, min_images, keep = _choose(angles, labels)
    out = root / "cleaned"
    code = cli.main(["clean", "--checkpoint", str(root / "k3"), "--pack", str(pack), "--output", str(out),
                     "--threshold-deg", repr(threshold), "--min-images", str(min_images), "--batch-size", "16"])
    assert code == 0
    return {"root": root, "pack": pack, "records": records, "labels": labels, "keep": keep, "out": out,
            "threshold": threshold, "min_images": min_images}


def test_clean_drops_exactly_the_reference_samples_and_classes(trained: dict[str, Any]) -> None:
    keep, labels, out = trained["keep"], trained["labels"], trained["out"]
    assert 0 < keep.sum() < len(keep)
    source = np.load(out / "clean_source_index.npy")
    assert sorted(source.tolist()) == np.flatnonzero(keep).tolist()
    cleaned = _records(out)
    assert len(cleaned) == keep.sum()
    kept_classes = sorted(set(labels[keep].tolist()))
    dense = {c: i for i, c in enumerate(kept_classes)}
    # every written record is its source record's image, relabelled densely, grouped by class in order
    assert [lab for lab, _ in cleaned] == sorted(dense[labels[i]] for i in source)
    for (lab, image), i in zip(cleaned, source, strict=True):
        assert image == trained["records"][i][1] and lab == dense[labels[i]]
    assert (out / "property").read_text().split(",")[0] == str(len(kept_classes))


def test_report_agrees_with_the_pack_and_the_noise_truth(trained: dict[str, Any]) -> None:
    keep, labels, out = trained["keep"], trained["labels"], trained["out"]
    report = json.loads((out / "clean.json").read_text())
    near = np.zeros(len(keep), bool)
    near[np.flatnonzero(keep)] = True
    assert report["samples_in"] == len(keep) and report["samples_out"] == int(keep.sum())
    assert report["classes_in"] == IDENTITIES and report["classes_out"] == len(set(labels[keep].tolist()))
    assert report["samples_in"] - report["samples_out"] == sum(report["samples_dropped"].values())
    assert report["samples_dropped"]["small_class"] > 0 and report["classes_dropped"]["small_class"] > 0
    assert sum(report["dominant_subcenter_classes"]) == IDENTITIES
    assert report["dominant_subcenter_classes"][0] < IDENTITIES  # some class is dominated by another row than 0
    truth = json.loads((trained["pack"] / "noise.json").read_text())
    wrong = np.zeros(len(keep), bool)
    wrong[truth["mislabelled"]["index"]] = True
    assert report["noise"]["mislabelled"] == wrong.sum()
    assert report["noise"]["mislabelled_dropped"] == (wrong & ~keep).sum()
    assert report["noise"]["correct_dropped"] == (~wrong & ~keep).sum()
    assert (out / "clean_angles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ofrecord_output_holds_the_same_records(trained: dict[str, Any]) -> None:
    out = trained["root"] / "cleaned_ofrecord"
    code = cli.main(["clean", "--checkpoint", str(trained["root"] / "k3"), "--pack", str(trained["pack"]),
                     "--output", str(out), "--threshold-deg", repr(trained["threshold"]), "--min-images",
                     str(trained["min_images"]), "--format", "ofrecord"])
    assert code == 0 and sorted(p.name for p in out.glob("part-*")) == ["part-00000"]
    assert _records(out) == _records(trained["out"])


def test_retrain_k1_on_the_cleaned_pack_then_k1_is_refused(trained: dict[str, Any],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = trained["root"]
    argv = tiny_args(root, root / "k1", 2, "--data.source=recordio", f"--data.path={trained['out']}",
                     "--head.subcenters=1")
    results = run_distributed(train_worker, 2, argv)
    assert [r["code"] for r in results] == [0, 0]
    assert len(results[0]["losses"]) == 2 and all(math.isfinite(x) for x in results[0]["losses"])
    capsys.readouterr()
    code = cli.main(["clean", "--checkpoint", str(root / "k1"), "--pack", str(trained["out"]),
                     "--output", str(root / "again")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "subcenters=1" in err[0] and "--head.subcenters=3" in err[0], err
    assert not (root / "again").exists()


def _clean_argv(trained: dict[str, Any], out: Path) -> list[str]:
    return ["clean", "--checkpoint", str(trained["root"] / "k3"), "--pack", str(trained["pack"]), "--output",
            str(out), "--threshold-deg", repr(trained["threshold"]), "--min-images", str(trained["min_images"])]


def test_a_full_disk_during_clean_leaves_no_output(trained: dict[str, Any]) -> None:
    """The cleaned pack is ~0.5 MB: a 100 KB file-size limit fails its write half-way (EFBIG, as ENOSPC)."""
    from tests.support.fault_fixtures import megaface, one_error_line

    parent = trained["root"] / "full_disk"
    parent.mkdir()
    out = parent / "cleaned"
    line = one_error_line(megaface(_clean_argv(trained, out), limit_bytes=100_000), "clean", 1)
    assert str(out) in line or str(parent) in line, line
    assert list(parent.iterdir()) == []  # no pack, no report, no temporary left behind


def test_sigterm_or_ctrl_c_during_clean_leaves_nothing_or_the_whole_output(trained: dict[str, Any]) -> None:
    """Stopped at some moment (start-up, embedding or writing): the output is absent or complete, and a
    stop inside the command is one line with 128 + the signal number."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    from tests.support.fault_fixtures import PROGRESS

    stopped_inside = {signal.SIGTERM: 0, signal.SIGINT: 0}
    for after_s in (1.5, 3.0):
        for sig in (signal.SIGTERM, signal.SIGINT):
            parent = trained["root"] / f"stopped_{sig.name}_{after_s}"
            parent.mkdir()
            out = parent / "cleaned"
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            proc = subprocess.Popen([sys.executable, "-m", "megaface", *_clean_argv(trained, out)], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(after_s)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
            left = sorted(p.name for p in parent.iterdir())
            # -sig: the signal came while Python was starting (before its handlers) or exiting (after them)
            assert proc.returncode in (0, 128 + sig, -sig), (proc.returncode, err[-2000:])
            if left == ["cleaned"]:  # it had finished: the whole output, its report included
                assert _records(out) == _records(trained["out"]) and (out / "clean.json").is_file()
                if proc.returncode == 128 + sig:  # the stop landed after the rename: the line says so
                    lines = [ln for ln in err.strip().splitlines() if not PROGRESS.match(ln)]
                    assert lines == [f"megaface clean: stopped by {sig.name}; {out} was already complete (written "
                                     "aside, then renamed into place whole)"], err[-2000:]
                continue
            assert left == [], (left, err[-2000:])  # no output, no temporary
            if proc.returncode == 128 + sig:
                stopped_inside[sig] += 1
                lines = [ln for ln in err.strip().splitlines() if not PROGRESS.match(ln)]
                assert lines == [f"megaface clean: stopped by {sig.name}; outputs appear only when complete, so "
                                 "nothing half-written was left: rerun the command"], err[-2000:]
    assert all(stopped_inside.values()), stopped_inside  # each signal was caught inside the command at least once


def test_a_stop_right_after_the_rename_names_the_complete_output(trained: dict[str, Any], capsys,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C landing between the final rename and the end of the command: the output stays (whole, report
    included) and the one line says it is complete instead of advising a rerun."""
    import megaface.eval.cli as eval_cli

    real = eval_cli.replace_dir

    def rename_then_stop(tmp: Path, target: Path) -> None:
        real(tmp, target)
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "replace_dir", rename_then_stop)
    out = trained["root"] / "stopped_after_rename"
    capsys.readouterr()
    assert cli.main(_clean_argv(trained, out)) == 130
    from tests.support.fault_fixtures import PROGRESS

    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not PROGRESS.match(ln)]
    assert lines == [f"megaface clean: stopped by SIGINT; {out} was already complete (written aside, then renamed "
                     "into place whole)"], lines
    assert _records(out) == _records(trained["out"]) and (out / "clean.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_clean_draws_bars_on_a_terminal(trained: dict[str, Any]) -> None:
    from tests.conftest import ROOT, run_under_pty

    out = trained["root"] / "on_a_terminal"
    rc, text = run_under_pty([sys.executable, "-m", "megaface", *_clean_argv(trained, out)],
                             env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=240)
    kept = int(trained["keep"].sum())
    assert rc == 0 and "clean: embed: 100%|" in text and "clean: write: 100%|" in text, text[-3000:]
    assert f"{len(trained['labels'])}/{len(trained['labels'])}" in text and f"{kept}/{kept}" in text, text[-3000:]
    assert "\r" in text and "done in" not in text, text[-3000:]
