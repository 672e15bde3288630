"""The README's "Next steps", each command run as the README gives it, on tiny data.

The commands are read from the README's "Next steps" block (so the README cannot drift from what is tested)
and run by bash in a scratch directory that looks like a checkout (`launch/` and `ds_configs/` linked in).
Only what a 2-core test machine needs is changed: faces/ holds a few random images, the packs' lfw.bin /
cfp_fp.bin / agedb_30.bin are a tiny synthetic val.bin, trainings run 2 steps with a small micro batch, and
the multi-node command runs on one node with a tiny network (no dropout) in place of IResNet-100.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megaface.data import encode_jpeg, open_pack
from megaface.data.synthetic import write_synthetic
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 600  # per command: seconds on an idle machine, minutes on a loaded shared one
FIXTURES_S = 2 * JOB_TIMEOUT_S  # pytest-timeout counts the module fixtures a test starts
TINY_TRAIN = ("--max-steps 2 --data.workers=0 --train.progress=off --train.tensorboard=false "
              "--train.log_every=1")
TRAIN_LINE = re.compile(r"^train: iter (\d+), loss (\S+)", re.M)


def readme_next_steps() -> list[str]:
    """The command lines of the README's "Next steps" code block (comments and blank lines dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Next steps\n(.*?)^## ", text, re.M | re.S)
    if section is None:
        raise AssertionError("README.md has no '## Next steps' section followed by another section")
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S)
    if block is None:
        raise AssertionError("README.md's Next steps section has no ```bash block")
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def step(word: str) -> str:
    """The one Next-steps command that contains `word`."""
    found = [line for line in readme_next_steps() if word in line]
    assert len(found) == 1, f"expected one Next-steps command with {word!r}, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch 'checkout': launch/ and ds_configs/ linked in, `megaface` on PATH, faces/ with 3 identities,
    and a tiny synthetic val.bin to stand in for InsightFace's verification packs."""
    work = tmp_path_factory.mktemp("next_steps")
    for name in ("launch", "ds_configs"):
        (work / name).symlink_to(ROOT / name)
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "megaface"
    wrapper.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -m megaface "$@"\n')
    wrapper.chmod(0o755)
    rng = np.random.default_rng(0)
    for identity in ("alice", "bob", "carol"):
        (work / "faces" / identity).mkdir(parents=True)
        for j in range(4):
            image = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
            (work / "faces" / identity / f"{j}.jpg").write_bytes(encode_jpeg(image, quality=90))
    write_synthetic(work / "val", identities=6, images_per_identity=4, val_pairs=20, seed=1)
    return work


def env_for(work: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join([str(work / ".bin"), str(Path(sys.executable).parent), os.environ["PATH"]]),
               MASTER_PORT=str(free_port()))
    env.pop("MASTER_ADDR", None)
    return env


def run(command: str, work: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=work, env=env_for(work), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)


def check(done: subprocess.CompletedProcess) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"exit code {done.returncode}\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def packed(workdir: Path) -> Path:
    """Step 1 (pack an image folder), then InsightFace's three verification packs placed next to it."""
    check(run(step("megaface pack rec"), workdir))
    pack = workdir / "data" / "mine"
    for name in ("lfw.bin", "cfp_fp.bin", "agedb_30.bin"):
        shutil.copy(workdir / "val" / "val.bin", pack / name)
    return pack


@pytest.fixture(scope="module")
def trained(workdir: Path, packed: Path) -> str:
    """Step 2 (a recipe from launch/ on the pack), 2 iterations, 4 images per rank."""
    return check(run(f"PER_GPU_BATCH=4 {step('launch/train_mobilefacenet_mp.sh')} {TINY_TRAIN}", workdir))


@pytest.mark.timeout(FIXTURES_S)
def test_pack_an_image_folder(packed: Path) -> None:
    pack = open_pack(packed)
    assert len(pack) == 12 and pack.num_classes == 3


@pytest.mark.timeout(FIXTURES_S + JOB_TIMEOUT_S)
def test_train_a_recipe_on_the_pack(workdir: Path, trained: str) -> None:
    assert [int(i) for i, _ in TRAIN_LINE.findall(trained)] == [0, 1], trained[-4000:]
    assert "world size 2," in trained and "Validation on [lfw]:" in trained, trained[-4000:]
    meta = json.loads((workdir / "runs" / "mine" / "best_lfw.pt.json").read_text())
    assert meta["network"] == "mobilefacenet" and meta["num_classes"] == 3 and meta["world_size"] == 2


@pytest.mark.timeout(FIXTURES_S + JOB_TIMEOUT_S)
def test_evaluate_on_lfw(workdir: Path, trained: str) -> None:
    out = check(run(step("megaface eval"), workdir))
    accuracy = re.search(r"Accuracy-Flip: ([0-9.]+)", out)
    assert accuracy is not None and 0.0 <= float(accuracy.group(1)) <= 1.0, out[-4000:]


@pytest.mark.slow  # 1-3 minutes; the deepspeed launcher with a hostfile runs by default in test_launchers.py
@pytest.mark.timeout(FIXTURES_S + JOB_TIMEOUT_S)
def test_scale_with_a_deepspeed_hostfile(workdir: Path, packed: Path) -> None:
    """Step 4 on one node of 2 CPU ranks (the README's 2 x 8 GPUs need a cluster), tiny network."""
    command = step("HOSTFILE=")
    assert "NODES=2" in command and "launch/hostfile" in command, command
    hostfile = workdir / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    command = (command.replace("NODES=2", "NODES=1").replace("GPUS_PER_NODE=8", "GPUS_PER_NODE=2")
               .replace("HOSTFILE=launch/hostfile", f"HOSTFILE={hostfile}"))
    dry = check(run(f"DRY_RUN=1 {command}", workdir))
    assert dry.startswith("deepspeed --hostfile "), dry  # the script starts DeepSpeed's launcher
    out = check(run(f"PER_GPU_BATCH=4 {command} {TINY_TRAIN} --model.network=mobilefacenet_tiny "
                    "--model.dropout=null", workdir))  # the tiny network has no dropout layer
    assert [int(i) for i, _ in TRAIN_LINE.findall(out)] == [0, 1], out[-4000:]
    assert "world size 2," in out, out[-4000:]
