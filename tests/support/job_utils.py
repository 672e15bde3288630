"""Start `megaface train` (or a test entry module) under a launcher, in its own process group.

`os.killpg(job.pid, sig)` then signals the launcher and its ranks alike, as a terminal's Ctrl-C or a batch
system's preemption does.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from tests.conftest import ROOT, free_port


def launcher_command(launcher: str, nproc: int, module: str, tmp: Path) -> list[str]:
    """The command before `train ARGS`: torchrun, the deepspeed launcher (a localhost hostfile) or plain
    python (one process)."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", "-m", module]
    if launcher == "deepspeed":
        hostfile = tmp / "hostfile"
        hostfile.write_text(f"localhost slots={nproc}\n")
        return ["deepspeed", "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), "--module", module]
    return [sys.executable, "-m", module]


def start_job(args: list[str], log: Path, module: str = "megaface", limit_bytes: int | None = None,
              nproc: int = 2, launcher: str = "torchrun", env: dict[str, str] | None = None) -> subprocess.Popen:
    """The launcher process of a `train ARGS` job writing stdout+stderr to `log`; `limit_bytes` sets the
    file-size limit (ulimit -f) of the whole job; `env` adds variables (tests.support.fault_entry's hooks)."""

    def setup() -> None:
        os.setsid()
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
                **(env or {})}
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    cmd = [*launcher_command(launcher, nproc, module, log.parent), "train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=setup)


def torchrun(args: list[str], log: Path, module: str = "megaface", limit_bytes: int | None = None,
             nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.Popen:
    return start_job(args, log, module, limit_bytes, nproc, "torchrun", env)


def wait_for(predicate: Callable[[], bool], job: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    """Poll until `predicate()` holds; fail with the log if the job ends or the time runs out first."""
    deadline = time.time() + seconds
    while not predicate():
        assert job.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.1)
