"""Start `megaface train` (or a test entry module) under torchrun with 2 ranks, in its own process group."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from tests.dist_utils import free_port
from tests.test_train import ROOT


def torchrun(args: list[str], log: Path, module: str = "megaface", limit_bytes: int | None = None,
             nproc: int = 2) -> subprocess.Popen:
    """The launcher process (its own session: `os.killpg(p.pid, sig)` signals launcher and ranks alike, as a
    terminal's Ctrl-C or a batch system does). `module` runs as `python -m module train ARGS` on each rank;
    `limit_bytes` sets the file-size limit (ulimit -f) of the whole job."""

    def setup() -> None:
        os.setsid()
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", module, "train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=setup)


def wait_for(predicate, launcher: subprocess.Popen, log: Path, seconds: float = 300) -> None:  # type: ignore[no-untyped-def]
    """Poll until `predicate()` holds; fail with the log if the job ends or the time runs out first."""
    deadline = time.time() + seconds
    while not predicate():
        assert launcher.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
