"""Every rank says the same thing (issue 20, item 8): 2-rank torchrun jobs on gloo.

- a label >= num_classes read by a loader worker of one rank: every rank ends with one line naming it
  (the other rank used to print gloo's "Connection closed by peer" traceback);
- a loader worker killed with SIGKILL (what the OOM killer sends): one line naming the worker and the signal;
- a SIGSTOP'd rank ends the job within train.collective_timeout_s + 15 s, every live rank naming it, the
  latest checkpoint intact (slow);
- a single process whose MASTER_PORT is taken: one line, not DistNetworkError.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaface.cli import main as megaface_main
from tests.conftest import ROOT, _rank_pids, free_port, tiny_args
from tests.support.fault_fixtures import megaface, raw_pack


def _torchrun(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MEGAFACE_TRACEBACK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megaface", "train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(job: subprocess.Popen, timeout: float) -> int:
    try:
        return job.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)


def _no_rank_traceback(text: str) -> None:
    """No traceback from a rank (torchrun's own ChildFailedError summary is the launcher's, not megaface's)."""
    assert "megaface/train" not in text and "megaface/data" not in text, text[-4000:]
    assert "Connection closed" not in text and "DataLoader worker" not in text, text[-4000:]


def _rank_lines(text: str) -> dict[int, list[str]]:
    """Each rank's `[rank R] megaface train: error: ...` lines."""
    lines: dict[int, list[str]] = {}
    for line in text.splitlines():
        for rank in (0, 1):
            marker = f"[rank {rank}] megaface train: error: "
            if marker in line:
                lines.setdefault(rank, []).append(line.split(marker, 1)[1])
    return lines


def _pack_args(pack: Path, out: Path, *extra: str) -> list[str]:
    return [*tiny_args(out.parent / "cache", out, 6), "--data.source=recordio", f"--data.path={pack}",
            "--data.flip=false", "--head.sample_rate=1.0", *extra]


def test_bad_label_in_a_worker_ends_every_rank_with_its_line(tmp_path: Path) -> None:
    labels = [k % 4 for k in range(32)]
    labels[13] = 9  # outside the 4 classes of the property file
    pack = raw_pack(tmp_path / "pack", labels, classes=4)
    log = tmp_path / "job.log"
    code = _finish(_torchrun(_pack_args(pack, tmp_path / "run", "--data.workers=1"), log), timeout=240)
    text = log.read_text()
    lines = _rank_lines(text)
    assert code != 0 and sorted(lines) == [0, 1], text[-4000:]
    assert all(len(v) == 1 for v in lines.values()), text[-4000:]
    assert all("has label 9, outside [0, 4)" in v[0] for v in lines.values()), lines
    _no_rank_traceback(text)


def test_killed_loader_worker_is_one_line(tmp_path: Path) -> None:
    """One process: torch raises the worker's death from its SIGCHLD handler, wherever the trainer is."""
    pack = raw_pack(tmp_path / "pack", [k % 4 for k in range(64)], classes=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MEGAFACE_TRACEBACK", None)
    log = tmp_path / "run.log"
    job = subprocess.Popen([sys.executable, "-m", "megaface", "train",
                            *_pack_args(pack, tmp_path / "run", "--data.workers=1", "--max-steps", "100000")],
                           cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "train: iter 2" not in log.read_text():
            assert job.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.3)
        workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 1, workers
        os.kill(int(workers[0]), signal.SIGKILL)  # what the kernel's OOM killer sends
        code = _finish(job, timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    errors = [line for line in log.read_text().splitlines() if "error" in line]
    assert code == 1 and len(errors) == 1 and "Traceback" not in log.read_text(), log.read_text()[-4000:]
    assert errors[0].startswith(f"megaface train: error: data loader worker (pid {workers[0]}) was killed by "
                                "SIGKILL (Killed) (most likely the kernel's OOM killer"), errors
    assert "lower data.workers (now 1)" in errors[0]


@pytest.mark.slow
def test_killed_loader_worker_is_one_line_on_every_rank(tmp_path: Path) -> None:
    pack = raw_pack(tmp_path / "pack", [k % 4 for k in range(64)], classes=4)
    log = tmp_path / "job.log"
    job = _torchrun(_pack_args(pack, tmp_path / "run", "--data.workers=1", "--max-steps", "100000",
                               "--train.log_every=1"), log)
    try:
        deadline = time.time() + 240
        while "train: iter 2" not in log.read_text():
            assert job.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.3)
        ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        workers = subprocess.run(["pgrep", "-P", ranks[0]], capture_output=True, text=True).stdout.split()
        assert workers, "rank 0 has no loader worker"
        os.kill(int(workers[0]), signal.SIGKILL)  # what the kernel's OOM killer sends
        code = _finish(job, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    lines = _rank_lines(text)
    assert code != 0 and sorted(lines) == [0, 1] and all(len(v) == 1 for v in lines.values()), text[-4000:]
    assert all(f"data loader worker (pid {workers[0]}) was killed by SIGKILL" in v[0] for v in lines.values()), lines
    assert all("data.workers" in v[0] for v in lines.values())
    _no_rank_traceback(text)


def test_busy_output_directory_is_each_ranks_own_line(tmp_path: Path) -> None:
    """The output directory is locked by another run: every rank raises the same error after one broadcast and
    prints it itself (not the peer path's "rank 0: ..." line that a heartbeat post would give a late rank)."""
    from megaface.train.run_lock import RunLock

    out, log = tmp_path / "run", tmp_path / "run.log"
    holder = RunLock(out, lambda message: None)
    try:
        job = _torchrun(tiny_args(tmp_path / "cache", out, 2), log)
        code = _finish(job, timeout=240)
    finally:
        holder.release()
    text = log.read_text()
    lines = _rank_lines(text)
    assert code != 0 and sorted(lines) == [0, 1], text[-4000:]
    for rank in (0, 1):
        assert len(lines[rank]) == 1 and "in use" in lines[rank][0] and f"pid {os.getpid()}" in lines[rank][0]
        assert not lines[rank][0].startswith("rank 0: "), lines
    _no_rank_traceback(text)


@pytest.mark.slow
def test_stopped_rank_ends_the_job_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rank stopped with SIGSTOP while the job saves every 2 iterations: the job ends within
    collective_timeout_s + 15 s, the live rank names the stopped one (rank, pid, host) from the store heartbeat,
    and the latest checkpoint stays intact."""
    out, log, timeout = tmp_path / "run", tmp_path / "run.log", 15
    job = _torchrun(tiny_args(tmp_path / "cache", out, 100000, "--save-every", "2",
                              f"--train.collective_timeout_s={timeout}"), log)
    ranks: list[int] = []
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "latest").exists() or "train: iter 3" not in log.read_text():
            assert job.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.3)
        ranks = _rank_pids(job.pid)
        assert len(ranks) == 2, ranks
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.time()
        code = job.wait(timeout=timeout + 120)
        seconds = time.time() - stopped_at
    finally:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    lines = _rank_lines(text)
    # the host as "address (host name)": the host name alone is the same on many hosts
    named = re.search(rf"rank (\d) \(pid {stopped} on \S+ \({re.escape(socket.gethostname())}\)\) sent no heartbeat",
                      text)
    assert code != 0 and named, text[-4000:]
    live = 1 - int(named.group(1))
    assert lines.get(live) and named.group(0) in lines[live][0], lines
    assert "train.collective_timeout_s=15" in lines[live][0]
    assert seconds < timeout + 15, f"job ended {seconds:.0f} s after the stop (timeout {timeout} s)"
    _no_rank_traceback(text)
    capsys.readouterr()
    assert megaface_main(["convert", "inspect", str(out)]) == 0, capsys.readouterr()  # latest is intact


def test_single_process_with_a_taken_master_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = megaface(["train", *tiny_args(tmp_path / "cache", tmp_path / "run", 1)],
                          env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"MASTER_PORT={port} on MASTER_ADDR=127.0.0.1 is already in use" in lines[0], lines
