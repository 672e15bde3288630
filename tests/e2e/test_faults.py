"""Faults and bad input: clear errors, exit codes, nothing written; a killed rank stops the job; resume."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from megaface.checkpoint import find_checkpoint
from megaface.cli import main as cli_main
from tests.conftest import _rank_pids, _torchrun, tiny_args


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def _cli_child(args: list[str], log: str, queue: "mp.Queue[int]") -> None:
    with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        queue.put(cli_main(["train", *args]))  # megaface.cli prints what `train` raises


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI as one process in a forked child (DeepSpeed keeps per-process state across runs)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        child = ctx.Process(target=_cli_child, args=(args, log.name, queue))
        child.start()
        child.join(timeout=300)
        code = queue.get(timeout=5) if child.exitcode == 0 else -1
        return code, Path(log.name).read_text()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def test_bad_ds_batch_size_and_fp16_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": 2, "gradient_clipping": 0.0}))
    out = tmp_path / "run"
    code, text = _main([*tiny_args(tmp_path, out, 2), "--ds-config", str(ds)], capsys)
    assert code == 2 and "train_batch_size=100" in text and "= 8" in text
    code, text = _main([*tiny_args(tmp_path, out, 2), "--ds.fp16.enabled=true"], capsys)
    assert code == 2 and "fp16" in text and "CPU" in text
    code, text = _main([*tiny_args(tmp_path, out, 2), "--train.max_stepz=3"], capsys)
    assert code == 2 and "did you mean 'train.max_steps'" in text
    assert not out.exists()


def test_label_outside_num_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from megaface.data import PackWriter, encode_jpeg

    pack = tmp_path / "pack"
    rng = np.random.default_rng(0)
    with PackWriter(pack, (112, 112)) as writer:
        for label in (0, 0, 1, 1, 2, 2, 3, 3):
            writer.add(label, encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)))
    (pack / "property").write_text("3,112,112\n")  # the data holds label 3 >= 3 classes
    out = tmp_path / "run"
    code, text = _main([*tiny_args(tmp_path, out, 2), "--data.source=recordio", f"--data.path={pack}"], capsys)
    assert code == 2 and "3" in text and "class" in text
    assert not (out / "checkpoints").exists()


def test_other_network_checkpoint_and_non_finite_loss(cache: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, _ = _main(tiny_args(cache, out, 1), capsys)
    assert code == 0
    before = _files(out)
    code, text = _main([*tiny_args(cache, out, 2, "--resume", "latest"), "--model.network=mobilefacenet"], capsys)
    assert code == 2 and "mobilefacenet_tiny" in text and "network" in text
    assert _files(out) == before  # nothing written
    code, text = _main(tiny_args(cache, tmp_path / "nan", 6, "--optim.lr=1e30"), capsys)
    assert code == 1 and "non-finite loss" in text and "at iteration" in text
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_interrupted_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_00000004").mkdir(parents=True)
    (ckpt / "step_00000004" / "meta.json").write_text("{}")
    (ckpt / "step_00000008.tmp").mkdir()  # a save that died before its rename
    (ckpt / "latest").write_text("step_00000004\n")
    assert find_checkpoint("latest", tmp_path).name == "step_00000004"
    (ckpt / "latest").unlink()
    assert find_checkpoint("latest", tmp_path).name == "step_00000004"
    with pytest.raises(ValueError, match="incomplete"):
        find_checkpoint(str(ckpt / "step_00000008.tmp"), tmp_path)


def test_killed_rank_stops_the_job_and_resume_continues(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = tiny_args(cache, out, 400, "--save-every", "2", "--train.collective_timeout_s=30")
    launcher = _torchrun(args, tmp_path / "first.log")
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "latest").exists():
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.5)
        ranks = _rank_pids(launcher.pid)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.time()
        code = launcher.wait(timeout=60)
        assert code != 0 and time.time() - killed_at < 60
        for pid in ranks:  # the surviving rank is gone too
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    text = (tmp_path / "first.log").read_text()
    # the survivor ends with one line naming the killed rank (was gloo's "Connection closed by peer" traceback)
    lines = [line for line in text.splitlines() if "megaface train: error:" in line]
    assert len(lines) == 1 and f"(pid {ranks[1]} on " in lines[0] and "ended without an error line" in lines[0], \
        text[-4000:]
    assert "megaface/train" not in text and "Connection closed" not in text, text[-4000:]
    tag = find_checkpoint("latest", out)
    done = int(tag.name.split("_")[1])
    resume = _torchrun(tiny_args(cache, out, done + 2, "--resume", "latest"), tmp_path / "second.log")
    assert resume.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()
    text = (tmp_path / "second.log").read_text()
    assert f"at iteration {done}" in text and f"train: iter {done + 1}," in text
