"""benchmarks/learning.py's head arms on the noisy set: per-pack log parsing, their commands, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import learning


def test_parse_packs_reads_every_pack_of_every_validation() -> None:
    log = ("validation at iteration 50 (10 s into training):\nValidation on [val]:\nAccuracy-Flip: 0.71000+-0.01\n"
           "Validation on [val_lq]:\nAccuracy-Flip: 0.5+-0.1\nvalidation at iteration 100 (20 s):\n"
           "Validation on [val]:\nAccuracy-Flip: 0.86500+-0.02\nValidation on [val_lq]:\nAccuracy-Flip: 0.6+-0.1\n")
    assert learning.parse_packs(log) == {"val": {50: 0.71, 100: 0.865}, "val_lq": {50: 0.5, 100: 0.6}}
    assert learning.parse_log(log) == {50: 0.71, 100: 0.865}  # the older arms still read the first pack


def test_noisy_arm_commands(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pack = tmp_path / "noisy"
    monkeypatch.setattr(learning, "noisy_pack", lambda cache_dir: pack)
    cmd = learning.command("noisy_adaface", 1, 30, tmp_path / "out", tmp_path, learning.QUICKSTART)
    assert f"--data.path={pack}" in cmd and "--head.margin=adaface" in cmd and "--data.augment.crop_p=0.2" in cmd
    bins = json.loads(next(a for a in cmd if a.startswith("--validation.bins=")).split("=", 1)[1])
    assert bins == [str(pack / "val.bin"), str(pack / "val_lq.bin")]
    assert not set(learning.SEED_BEHAVIOUR) & set(cmd)  # the shipped config, not the seed's behaviour
    cleaned = learning.command("noisy_subcenter3_clean", 1, 30, tmp_path / "o", tmp_path, learning.QUICKSTART,
                               data_path=tmp_path / "cleaned")
    assert f"--data.path={tmp_path / 'cleaned'}" in cleaned and "--head.subcenters=1" in cleaned


def test_table_rows() -> None:
    line = {"arm": "noisy_arcface", "seeds": [0, 1, 2], "acc": {"val": {"30": [0.7, 0.01]}, "val_lq": {}}}
    rows = learning.table([line], 30).splitlines()
    assert rows[2] == "| noisy_arcface | 3 | 0.7000 +- 0.0100 | - |"
