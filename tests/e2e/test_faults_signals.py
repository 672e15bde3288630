"""Preemption and Ctrl-C: signals sent to the whole job's process group, as a terminal or a batch system does.

On SIGTERM or SIGINT every rank finishes its iteration, the ranks agree, save a checkpoint and exit 143 / 130
with one line naming it and the resume command; a second Ctrl-C ends the job at once without a traceback;
`--resume auto` continues from `latest` or starts fresh; `train.save_every_minutes` saves by wall time.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from megaface.checkpoint import find_checkpoint, read_meta
from megaface.checkpoint.integrity import finite_problems, verify_files
from tests.conftest import tiny_args
from tests.support.job_utils import start_job, wait_for

ENTRY = "tests.support.fault_entry"


def _exit_codes(folder: Path) -> dict[str, int]:
    return {p.name: int(p.read_text()) for p in sorted(folder.glob("rank_*"))}


def _no_megaface_traceback(text: str) -> None:
    """Launchers print their own traceback on a signal (torchrun's SignalException, the deepspeed runner's
    KeyboardInterrupt); no rank may: no frame of megaface or of the test entry in the log."""
    assert not re.search(r'File "[^"]*(megaface/|fault_entry)', text), text[-4000:]


def _signal_job(tmp_path: Path, launcher: str, sig: int, *extra: str) -> tuple[str, dict[str, int], float]:
    """Start a 400-iteration job, signal its process group after iteration 3, wait for it: (log, exit code per
    rank, seconds from the signal to the end)."""
    out, log, codes = tmp_path / "run", tmp_path / f"{launcher}.log", tmp_path / "codes"
    codes.mkdir(exist_ok=True)
    job = start_job(tiny_args(tmp_path / "cache", out, 400, *extra), log, module=ENTRY, launcher=launcher,
                    env={"MEGAFACE_TEST_EXIT_DIR": str(codes)})
    try:
        wait_for(lambda: "train: iter 3," in log.read_text(), job, log)
        os.killpg(job.pid, sig)
        signalled = time.time()
        job.wait(timeout=120)
        seconds = time.time() - signalled
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    return log.read_text(), _exit_codes(codes), seconds


def _check_saved_and_named(text: str, out: Path, name: str) -> int:
    """The one 'stopped by' line names a complete, verified, finite checkpoint that is `latest`; its iteration."""
    stops = [line for line in text.splitlines() if f"train: stopped by {name} after" in line]
    assert len(stops) == 1, text[-4000:]
    done = int(re.search(r"after (\d+) iterations", stops[0]).group(1))
    tag = out / "checkpoints" / f"step_{done:08d}"
    assert f"saved {tag}; resume with: megaface train " in stops[0] and stops[0].endswith("--resume latest")
    assert find_checkpoint("latest", out) == tag
    meta = read_meta(tag)
    assert verify_files(tag, meta["files"]) == [] and finite_problems(tag) == []
    assert 4 <= done <= 10  # iteration 3 was logged when the signal left; at most a couple more ran
    return done


def test_sigterm_under_torchrun_saves_then_resume_auto_continues(tmp_path: Path) -> None:
    out = tmp_path / "run"
    text, codes, seconds = _signal_job(tmp_path, "torchrun", signal.SIGTERM, "--resume", "auto")
    assert "resume: no checkpoint under" in text and "starting from scratch" in text  # auto on a fresh directory
    assert codes == {"rank_0": 143, "rank_1": 143}, text[-4000:]
    assert seconds < 60
    done = _check_saved_and_named(text, out, "SIGTERM")
    _no_megaface_traceback(text)
    log = tmp_path / "resume.log"
    job = start_job(tiny_args(tmp_path / "cache", out, done + 2, "--resume", "auto"), log)
    assert job.wait(timeout=300) == 0, log.read_text()[-4000:]
    resumed = log.read_text()
    assert f"resume: continuing from {out / 'checkpoints' / f'step_{done:08d}'} at iteration {done}" in resumed
    assert f"train: iter {done + 1}," in resumed


def test_ctrl_c_under_torchrun_saves_and_exits_130(tmp_path: Path) -> None:
    text, codes, seconds = _signal_job(tmp_path, "torchrun", signal.SIGINT)
    assert codes == {"rank_0": 130, "rank_1": 130}, text[-4000:]
    assert seconds < 60
    _check_saved_and_named(text, tmp_path / "run", "SIGINT")
    assert text.count("SIGINT received") == 1  # the launcher's forwarded copy is not a second Ctrl-C
    _no_megaface_traceback(text)


@pytest.mark.slow
def test_ctrl_c_under_the_deepspeed_launcher(tmp_path: Path) -> None:
    """The deepspeed launcher answers Ctrl-C by sending SIGTERM to its ranks right after the terminal's SIGINT."""
    text, codes, seconds = _signal_job(tmp_path, "deepspeed", signal.SIGINT)
    assert codes == {"rank_0": 130, "rank_1": 130}, text[-4000:]
    assert seconds < 60
    _check_saved_and_named(text, tmp_path / "run", "SIGINT")
    _no_megaface_traceback(text)


def test_second_ctrl_c_stops_at_once_without_traceback(tmp_path: Path) -> None:
    out, log, codes = tmp_path / "run", tmp_path / "run.log", tmp_path / "codes"
    codes.mkdir()
    job = start_job(tiny_args(tmp_path / "cache", out, 400), log, module=ENTRY, launcher="python",
                    env={"MEGAFACE_TEST_STEP_SLEEP": "3", "MEGAFACE_TEST_EXIT_DIR": str(codes)})
    try:
        wait_for(lambda: "start-up:" in log.read_text(), job, log)
        os.killpg(job.pid, signal.SIGINT)
        time.sleep(1.5)  # inside the first (slow) step: no checkpoint yet
        os.killpg(job.pid, signal.SIGINT)
        second = time.time()
        code = job.wait(timeout=60)
        seconds = time.time() - second
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 130 and seconds < 5, text[-4000:]
    assert "second Ctrl-C: stopping now, without a checkpoint" in text and "Traceback" not in text, text[-4000:]
    assert not (out / "checkpoints").exists() and not list(codes.iterdir())  # gone before any save


def test_save_every_minutes_saves_by_wall_time_on_two_ranks(tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "run.log"
    job = start_job(tiny_args(tmp_path / "cache", out, 10, "--train.save_every_minutes=0.01"), log, module=ENTRY,
                    env={"MEGAFACE_TEST_STEP_SLEEP": "0.4"})
    assert job.wait(timeout=300) == 0, log.read_text()[-4000:]
    saved = [int(m) for m in re.findall(r"checkpoint: saved \S+step_(\d+)", log.read_text())]
    # 0.6 s between saves, 0.4 s per step (more on a loaded machine): saves every 2-3 iterations, and the end
    assert saved[-1] == 10 and len(saved) >= 3 and saved == sorted(saved), saved
