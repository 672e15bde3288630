"""Checkpoint faults: a diverging run whose BatchNorm statistics turn inf before its loss does, and a
checkpoint save that hits a full disk (the file-size limit, `ulimit -f`).

What must hold: every tensor of every checkpoint left behind is finite and `latest` names one of them; a
failed save leaves the previous checkpoint `latest` and intact, no temporary, one line per rank naming the
path and the free space, and every rank exits.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megaface.checkpoint import find_checkpoint, read_meta
from megaface.checkpoint.integrity import finite_problems, list_files, non_finite_tensors
from tests.test_faults_run import _train
from tests.test_train import tiny_args


def test_huge_lr_leaves_only_finite_checkpoints(tmp_path: Path) -> None:
    """lr 1e6 with a save every iteration and keep_last=1: BatchNorm running_var turns inf while the loss is
    still finite; that state must not be saved (nor the one pruning would then leave alone)."""
    out = tmp_path / "run"
    code, text, _ = _train(tiny_args(tmp_path / "cache", out, 8, "--optim.lr=1e6", "--save-every", "1",
                                     "--train.keep_last=1"))
    assert code == 1, text
    tags = sorted(p for p in (out / "checkpoints").glob("step_*") if p.is_dir())
    assert tags, text  # the first iterations are finite: something usable is left
    latest = find_checkpoint("latest", out)
    assert latest in tags and read_meta(latest)["verified_finite"] is True
    assert f"the last healthy checkpoint is {latest}" in text
    for tag in tags:  # read back every tensor of every file that remains
        torch_files = [rel for rel in list_files(tag) if rel.endswith(".pt")]
        assert any(rel.startswith("ds/") for rel in torch_files) and any(rel.startswith("fc7/") for rel in
                                                                          torch_files)
        assert finite_problems(tag) == [], text
        assert all(non_finite_tensors(tag / rel) == [] for rel in torch_files)
