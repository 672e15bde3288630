"""DeepSpeed's comm start-up must not need a C++ compiler (megaface.distributed.ds_shm), in the trainer and in tests."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megaface.distributed.ds_shm import ENV_KEEP, skip_shm_build
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

# One rank starts DeepSpeed's comm backend (which builds the shm op unless skipped) and says what it got.
PROBE = """
import sys
from megaface.distributed.ds_shm import skip_shm_build
if sys.argv[1] == "skip":
    skip_shm_build()
import importlib, deepspeed
deepspeed.init_distributed(dist_backend="gloo")
print("shm op:", importlib.import_module("deepspeed.comm.comm").cdb.shm_comm_op)
"""


def test_skip_replaces_the_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(ds_torch_comm, "build_shm_op", ds_torch_comm.build_shm_op)  # restored afterwards
    monkeypatch.delenv(ENV_KEEP, raising=False)
    assert skip_shm_build() is True
    assert ds_torch_comm.build_shm_op() is None


def test_env_keeps_deepspeeds_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    original = ds_torch_comm.build_shm_op
    monkeypatch.setattr(ds_torch_comm, "build_shm_op", original)
    monkeypatch.setenv(ENV_KEEP, "1")
    assert skip_shm_build() is False
    assert ds_torch_comm.build_shm_op is original


def test_deepspeed_comm_starts_without_a_compiler(tmp_path: Path) -> None:
    """PATH holds no compiler (no c++/g++/cc) and the extension cache is empty: DeepSpeed's comm backend still
    starts, because the shm op is never built.

    The interpreter is run by its own path, not through a link elsewhere: a venv's python reached through a
    symlink in another directory no longer finds its pyvenv.cfg and runs the base interpreter without torch.
    """
    bin_dir = tmp_path / "bin"  # the whole PATH: empty, so no compiler can be found
    bin_dir.mkdir()
    assert not any(shutil.which(tool, path=str(bin_dir)) for tool in ("c++", "g++", "cc", "gcc"))
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "MEGAFACE_DS_SHM")}
    env.update(PATH=str(bin_dir), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(ROOT),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PROBE, "skip"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "shm op: None" in done.stdout, done.stdout[-3000:]
    assert not any((tmp_path / "ext").glob("**/*.so")), "an extension was built"
