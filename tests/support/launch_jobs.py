"""Tiny real `megaface train` jobs under launchers: their arguments, environment, checks and the 2-rank reference.

Shared by tests/e2e/test_launchers.py (every launcher on one host) and tests/multinode (two hosts): each job
trains a tiny MobileFaceNet on a few synthetic identities for STEPS iterations and prints one
`train: iter N, loss L, throughput: T` line per iteration. Every 2-rank job sees the same global batches, so
its losses must equal `reference_losses` (plain `torchrun --nproc_per_node 2`). The fixtures are imported
by the test modules that use them.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

LAUNCH = ROOT / "launch"
QUICKSTART = LAUNCH / "configs" / "quickstart.yaml"
STEPS = 3
TRAIN_LINE = re.compile(r"^train: iter (\d+), loss (\S+), throughput: ([0-9.]+)", re.M)
STARTUP_LINE = re.compile(r"start-up: ([0-9.]+) s to the first step")
JOB_TIMEOUT_S = 300  # generous: a loaded 2-core machine runs these jobs several times slower than an idle one


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def launcher_args(output: Path, cache: Path) -> list[str]:
    """`megaface train` arguments for a few-second run: quickstart with less of everything."""
    return ["--config", str(QUICKSTART), "--max-steps", str(STEPS), "--output", str(output),
            "--train.log_every=1", '--train.progress="off"', "--train.tensorboard=false",
            "--validation.interval=0", "--data.cache_dir=" + str(cache),
            "--data.synthetic.identities=40", "--data.synthetic.images_per_identity=4",
            "--data.synthetic.val_pairs=50", "--ds.train_micro_batch_size_per_gpu=8"]


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    env.update(extra)
    return env


def run_job(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env or job_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)
    proc.wall_s = time.monotonic() - start  # type: ignore[attr-defined]
    return proc


def check_training(proc: subprocess.CompletedProcess, world_size: int) -> list[float]:
    """Exit code 0 and one train line per iteration; returns the losses."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{out[-6000:]}"
    lines = TRAIN_LINE.findall(proc.stdout)
    assert [int(i) for i, _, _ in lines] == list(range(STEPS)), f"train lines: {lines}\n{out[-6000:]}"
    assert all(float(t) > 0 for _, _, t in lines)
    losses = [float(loss) for _, loss, _ in lines]
    assert all(0 < loss < 100 for loss in losses), losses
    assert f"world size {world_size}," in out, out[-3000:]
    startup = STARTUP_LINE.search(out)
    print(f"wall {proc.wall_s:.1f} s, start-up {startup.group(1) if startup else '?'} s")  # type: ignore
    return losses


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory: pytest.TempPathFactory, synthetic_cache: Path) -> list[float]:
    """The explicit reference every 2-rank launcher is held to: plain `torchrun --nproc_per_node 2`.

    The 2-rank jobs below see the same global batch sequence, so each must reproduce these losses."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = run_job(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "megaface",
                    "train", *launcher_args(out, synthetic_cache)])
    return check_training(proc, world_size=2)


def check_same_losses(losses: list[float], reference: list[float]) -> None:
    assert losses == pytest.approx(reference, rel=1e-5), (losses, reference)
