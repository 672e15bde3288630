"""Fault suite: a diverging run, damaged checkpoint files, a killed launcher and two runs on one directory
(the stopped rank is in test_faults_ranks.py). Each case checks the message, the exit code, the time to exit
and that nothing was lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaface.checkpoint import find_checkpoint, read_meta
from megaface.cli import main as megaface_main
from megaface.distributed import DistState
from tests.conftest import _rank_pids, _torchrun, _train, tiny_args


def _poison_after(calls: int) -> None:
    """Test hook (runs in the forked child): after `calls` train steps the backbone weights hold NaN, as
    after an update that overflowed, while the loss of that step was still finite."""
    import torch

    from megaface.train import loop

    original, count = loop.train_step, [0]

    def poisoned(parts, images, labels):  # type: ignore[no-untyped-def]
        value = original(parts, images, labels)
        count[0] += 1
        if count[0] >= calls:
            with torch.no_grad():
                next(parts.backbone.parameters()).fill_(float("nan"))
        return value

    loop.train_step = poisoned


def _inspect(path: Path, *flags: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = megaface_main(["convert", "inspect", str(path), *flags])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def diverged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """A run saving every iteration with keep_last=1 whose weights turn NaN in iteration 4."""
    root = tmp_path_factory.mktemp("diverge")
    out = root / "run"
    code, text, _ = _train(tiny_args(root / "cache", out, 8, "--save-every", "1", "--train.keep_last=1"),
                           hook=lambda: _poison_after(4))
    return out, code, text


def test_diverging_run_keeps_the_last_healthy_checkpoint(diverged: tuple[Path, int, str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out, code, text = diverged
    healthy = out / "checkpoints" / "step_00000003"
    assert code == 1, text
    assert "inf/NaN after iteration 4" in text and "checkpoint not saved" in text
    assert f"the last healthy checkpoint is {healthy}" in text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000003"]
    assert find_checkpoint("latest", out) == healthy
    assert read_meta(healthy)["verified_finite"] is True
    assert _inspect(out, "--verify", capsys=capsys)[0] == 0
    assert not (out / ".megaface.lock").exists()  # released on the error path too


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "ds bit flip": ("ds/mp_rank_00_model_states.pt", _flip, "sha256"),
    "ds truncated": ("ds/mp_rank_00_model_states.pt", _truncate, "truncated"),
    "fc7 bit flip": ("fc7/shard_00000_of_00001.pt", _flip, "sha256"),
    "fc7 truncated": ("fc7/shard_00000_of_00001.pt", _truncate, "truncated"),
    "ds missing": ("ds", lambda p: shutil.rmtree(p), "missing"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_files_are_detected_by_inspect_and_resume_check(
        case: str, diverged: tuple[Path, int, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from megaface.train.checkpointing import verify_checkpoint

    rel, damage, word = DAMAGE[case]
    tag = tmp_path / "step_00000003"
    shutil.copytree(diverged[0] / "checkpoints" / "step_00000003", tag)
    damage(tag / rel)
    code, text = _inspect(tag, capsys=capsys)
    assert code == 1 and "PROBLEM" in text and str(tag / rel) in text and word in text
    with pytest.raises(ValueError) as err:
        verify_checkpoint(tag, read_meta(tag), DistState(), log=print)
    message = str(err.value)
    assert "\n" not in message and str(tag / rel) in message and word in message
    if word == "sha256":  # names the expected and the found digest
        assert read_meta(tag)["files"][rel]["sha256"] in message


def test_resume_from_a_damaged_shard_is_one_clear_line(diverged: tuple[Path, int, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(diverged[0], out)
    shard = out / "checkpoints" / "step_00000003" / "fc7" / "shard_00000_of_00001.pt"
    _flip(shard)
    before = shard.read_bytes()
    code, text, _ = _train(tiny_args(out.parent / "cache", out, 6, "--resume", "latest"))
    errors = [line for line in text.splitlines() if "megaface train: error:" in line]
    assert code == 2 and len(errors) == 1 and str(shard) in errors[0] and "sha256" in errors[0], text
    assert "Traceback" not in text and shard.read_bytes() == before  # nothing rewritten


def test_second_run_on_one_directory_fails_fast_and_stale_lock_is_taken_over(tmp_path: Path) -> None:
    from megaface.train.run_lock import LOCK_FILE, RunLock

    messages: list[str] = []
    first = RunLock(tmp_path, messages.append)
    code, text, seconds = _train(tiny_args(tmp_path / "cache", tmp_path, 2))
    assert code == 2 and f"pid {os.getpid()} on host {socket.gethostname()}" in text and "in use" in text
    assert seconds < 60  # before the data, model and engine are built (shared CPUs: a generous bound)
    assert not (tmp_path / "checkpoints").exists()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    second = RunLock(tmp_path, messages.append)  # the dead holder's lock is taken over, with a message
    assert any("taking over" in m and dead.stdout.strip() in m for m in messages)
    second.release()


def _wait_for_checkpoint(out: Path, launcher: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").exists():
        assert launcher.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except FileNotFoundError:
        return False


def test_killed_launcher_ends_its_ranks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    launcher = _torchrun(tiny_args(tmp_path / "cache", out, 400, "--save-every", "2"), log)
    try:
        _wait_for_checkpoint(out, launcher, log)
        ranks = _rank_pids(launcher.pid)
        assert len(ranks) == 2
        os.kill(launcher.pid, signal.SIGKILL)
        killed_at = time.time()
        while any(_alive(pid) for pid in ranks) and time.time() - killed_at < 30:
            time.sleep(0.1)
        seconds = time.time() - killed_at
        assert not any(_alive(pid) for pid in ranks) and seconds < 5, f"ranks alive {seconds:.1f} s after kill -9"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    time.sleep(1)
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    time.sleep(3)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == saved  # no orphan kept saving
    assert find_checkpoint("latest", out).name in saved
