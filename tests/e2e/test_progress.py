"""The training progress bar: on rank 0 only, with an ETA, on stdout, and never in piped output."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from megaface.distributed import DistState
from megaface.train import logger as logging_utils
from megaface.train.logger import TrainLogger


class FakeTerminal(io.StringIO):
    """stdout as a terminal that reports 0 columns (as script(1) and some consoles do)."""

    def isatty(self) -> bool:
        return True


def _log_three(state: DistState, tmp_path: Path, progress: str) -> None:
    logger = TrainLogger(state, tmp_path, global_batch=64, total_steps=10, start_iteration=0, log_every=2,
                         tensorboard=False, progress=progress)
    for i in range(3):
        logger.iteration(i, loss=1.0, seconds=0.01, lr=0.1, loss_scale=None, skipped=0)
    logger.close()


def test_terminal_rank0_gets_a_bar_with_eta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = FakeTerminal()
    monkeypatch.setattr(logging_utils.sys, "stdout", out)
    _log_three(DistState(rank=0, world_size=2), tmp_path, "auto")
    text = out.getvalue()
    assert "3/10" in text and "<" in text, text  # [elapsed<remaining, rate]
    assert "train: iter 1, loss 1.0" in text  # log lines still come through the bar


def test_other_ranks_and_pipes_get_plain_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rank1 = FakeTerminal()
    monkeypatch.setattr(logging_utils.sys, "stdout", rank1)
    _log_three(DistState(rank=1, world_size=2), tmp_path, "auto")
    assert rank1.getvalue() == ""
    piped = io.StringIO()  # isatty() is False
    monkeypatch.setattr(logging_utils.sys, "stdout", piped)
    _log_three(DistState(rank=0, world_size=2), tmp_path, "auto")
    assert piped.getvalue() == "train: iter 1, loss 1.0, throughput: 6400.000, avg throughput: 6400.000, lr 0.1\n"


def test_a_terminal_of_size_zero_still_gets_a_drawable_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # script(1) and torchrun ranks under it report 0x0; tqdm then sizes itself to 0 rows and draws nothing
    monkeypatch.setattr(logging_utils.sys, "stdout", FakeTerminal())
    monkeypatch.setattr(logging_utils.shutil, "get_terminal_size", lambda fallback=(0, 0): os.terminal_size((0, 0)))
    logger = TrainLogger(DistState(), tmp_path, 64, 10, 0, tensorboard=False, progress="auto")
    assert logger.bar is not None and (logger.bar.ncols, logger.bar.nrows) == (100, 20)
    logger.close()
