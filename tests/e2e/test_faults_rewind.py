"""Divergence that rewinds itself (`train.on_nonfinite: rewind`): a poisoned batch (its images replaced by
inf on one rank) makes the loss NaN; the job reloads the newest verified checkpoint on every rank, skips the
data that diverged, trains on at a lowered lr and ends with a finite model; past max_rewinds it stops."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megaface.checkpoint import find_checkpoint
from megaface.checkpoint.integrity import finite_problems
from tests.conftest import tiny_args
from tests.support.job_utils import torchrun

REWIND = ["--train.on_nonfinite=rewind", "--train.rewind_cooldown_steps=3", "--train.rewind_lr_factor=0.1",
          "--save-every", "2"]


def _tensorboard_scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_poisoned_batch_rewinds_once_and_ends_finite_on_two_ranks(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    # the 6th step (iteration 5) of rank 1 gets an inf batch
    poison = {"MEGAFACE_TEST_POISON_CALLS": "6", "MEGAFACE_TEST_POISON_RANK": "1"}
    launcher = torchrun(tiny_args(tmp_path / "cache", out, 10, *REWIND, "--train.max_rewinds=2",
                                  "--train.tensorboard=true"), log, module="tests.support.fault_entry", env=poison)
    code = launcher.wait(timeout=400)
    text = log.read_text()
    assert code == 0, text[-4000:]
    rewinds = [line for line in text.splitlines() if "rewind 1 of 2" in line]
    assert len(rewinds) == 1 and "non-finite loss (nan) at iteration 5" in rewinds[0], text[-4000:]
    assert str(out / "checkpoints" / "step_00000004") in rewinds[0]
    assert "data of iterations 4-5 is skipped, lr x0.1 for 3 iterations" in rewinds[0]
    assert "rewind 2 of" not in text
    lrs = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"train: iter (\d+), .*?lr ([0-9.e+-]+)", text)}
    assert lrs[3] == pytest.approx(0.1) and lrs[9] == pytest.approx(0.1)  # before and after the cooldown
    assert [it for it, lr in lrs.items() if lr == pytest.approx(0.01)] == [4, 5, 6]  # last value logged per it
    final = find_checkpoint("latest", out)
    assert final.name == "step_00000010" and finite_problems(final) == []
    assert _tensorboard_scalars(out, "train/rewinds") == [(5, 1.0)]


def test_rewinds_are_limited_then_the_run_stops(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    launcher = torchrun(tiny_args(tmp_path / "cache", out, 12, *REWIND, "--train.max_rewinds=1"), log,
                        module="tests.support.fault_entry", nproc=1, env={"MEGAFACE_TEST_POISON_CALLS": "4,8"})
    code = launcher.wait(timeout=400)
    text = log.read_text()
    assert code == 1, text[-4000:]
    assert text.count("rewind 1 of 1 to") == 1 and "rewind 2" not in text
    stop = [line for line in text.splitlines() if "train.max_rewinds=1 rewinds used up" in line]
    assert len(stop) == 1 and "the last healthy checkpoint is" in stop[0], text[-4000:]
    assert finite_problems(find_checkpoint("latest", out)) == []
