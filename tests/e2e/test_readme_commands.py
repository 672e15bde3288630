"""The README's two one-line commands: their shape, CI running the test line verbatim, and the quickstart
script (launch/quickstart.sh) with its summary (megaface.train.summary), on tiny settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaface.checkpoint import save_backbone_file
from megaface.cli import main as cli_main
from megaface.data.synthetic import synthetic_dir
from megaface.train.summary import main as summary_main
from megaface.train.summary import pack_path, summarize
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 600  # seconds on an idle machine, minutes on a loaded shared one


def code_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def test_first_block_is_one_line_that_installs_and_runs_the_quickstart() -> None:
    lines = code_blocks()[0].strip().splitlines()
    assert len(lines) == 1, lines
    parts = [p.strip() for p in lines[0].split("&&")]
    # torch (the pinned build) before megaface, so megaface's `torch>=2.1` is already satisfied
    assert re.fullmatch(r"pip install torch==[0-9.]+\S*( .*)?", parts[0]), parts
    assert parts[1:] == ["pip install -e .", "bash launch/quickstart.sh"], parts


def test_ci_runs_the_readme_test_line_verbatim() -> None:
    test_lines = [b.strip() for b in code_blocks() if "pytest" in b and len(b.strip().splitlines()) == 1]
    assert test_lines, "README.md has no one-line test block"
    line = test_lines[0]
    assert line.startswith("pip install -e '.[test") and line.endswith("python -m pytest -q"), line
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert line in [c.strip() for c in ci], f".ci/run does not run the README's test line {line!r}"


def _best_file(output: Path, accuracy: float, cache: str) -> Path:
    cfg = {"data": {"source": "synthetic", "cache_dir": cache,
                    "synthetic": {"identities": 200, "images_per_identity": 20, "val_pairs": 600, "seed": 0}},
           "validation": {"bins": []}}
    path = output / "best_val.pt"
    save_backbone_file(path, {"w": torch.zeros(1)}, {"network": "mobilefacenet_tiny", "embedding_size": 128,
                                                    "iteration": 200, "pack": "val", "accuracy_flip": accuracy,
                                                    "config": cfg})
    return path


def test_summary_names_accuracy_model_and_eval_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _best_file(tmp_path, 0.93667, str(tmp_path / "cache"))
    val_bin = synthetic_dir(tmp_path / "cache", 200, 20, 600, 0) / "val.bin"
    lines = summarize(tmp_path, seconds=185)
    assert lines[0].startswith("done in 3 min 05 s: best Accuracy-Flip 0.93667 on val"), lines
    assert f"model: {model}" in lines[1]
    assert lines[2] == f"next: megaface eval --checkpoint {model} --bin {val_bin}"
    assert summary_main([str(tmp_path)]) == 0 and "0.93667" in capsys.readouterr().out


def test_summary_prefers_a_configured_bin() -> None:
    meta = {"pack": "lfw", "config": {"validation": {"bins": ["/data/cfp_fp.bin", "/data/lfw.bin"]},
                                      "data": {"source": "recordio"}}}
    assert pack_path(meta) == "/data/lfw.bin"


def test_summary_without_a_validated_model_says_why(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["summary", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megaface summary: error: ") and len(err.strip().splitlines()) == 1
    assert str(tmp_path) in err and "validation.interval=0" in err


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_quickstart_script_trains_and_prints_the_summary(tmp_path: Path) -> None:
    """launch/quickstart.sh on 2 ranks, shortened by arguments it passes through to `megaface train`."""
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT=str(tmp_path / "run"), MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    args = ["--max-steps", "2", "--validation.interval=2", "--train.tensorboard=false",
            f"--data.cache_dir={tmp_path / 'cache'}", "--data.synthetic.identities=20",
            "--data.synthetic.images_per_identity=4", "--data.synthetic.val_pairs=20",
            "--ds.train_micro_batch_size_per_gpu=4"]
    done = subprocess.run(["bash", str(ROOT / "launch" / "quickstart.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "\r" not in done.stdout, "a progress bar was drawn into piped output"
    summary = done.stdout.strip().splitlines()[-3:]
    assert re.match(r"done in \d+ min \d\d s: best Accuracy-Flip [0-9.]+ on val", summary[0]), summary
    model = tmp_path / "run" / "best_val.pt"
    assert summary[1].startswith(f"model: {model}") and model.is_file(), summary
    meta = json.loads((tmp_path / "run" / "best_val.pt.json").read_text())
    assert summary[2].startswith(f"next: megaface eval --checkpoint {model} --bin "), summary
    assert meta["world_size"] == 2 and meta["iteration"] == 2
