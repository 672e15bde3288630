"""Every long command shows progress: a bar under a real pty, plain lines when piped (megaface.utils.progress).

One interpreter under a pty runs pack rec, pack ofrecord, embed, eval and convert fc7 --reshard (a start of
Python with torch costs seconds on a shared machine); the piped case runs the same commands in this process,
where stderr is not a terminal. `convert consolidate` needs a DeepSpeed checkpoint: slow test. `clean` and
`eval-ijb` are tried under a pty beside their trained model and IJB folder (tests/e2e/test_clean.py,
tests/e2e/test_ijb_end_to_end.py).
"""

from __future__ import annotations

import json
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from megaface.cli import main as megaface_main
from tests.conftest import commands, run_under_pty
from tests.support.image_folders import make_folder

ROOT = Path(__file__).resolve().parents[2]


def make_inputs(root: Path) -> dict[str, str]:
    """Images, a tiny backbone file, a .bin of 4 pairs and an FC7 checkpoint of 2 shards."""
    import cv2

    from megaface.checkpoint.fc7_shards import SHARD_FORMAT
    from megaface.checkpoint.layout import fc7_shard_file_name
    from megaface.head.sharding import class_range
    from megaface.models import build_model

    images = make_folder(root / "faces", classes=3, size=112)
    torch.manual_seed(0)
    torch.save(build_model("mobilefacenet_tiny").state_dict(), root / "backbone.pt")
    (root / "backbone.pt.json").write_text(json.dumps({"network": "mobilefacenet_tiny", "embedding_size": 128}))
    rng = np.random.default_rng(0)
    faces = [cv2.imencode(".png", rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))[1].tobytes() for _ in range(8)]
    with open(root / "lfw.bin", "wb") as f:
        pickle.dump((faces, [True, False, True, False]), f)
    tag = root / "run" / "checkpoints" / "step_00000003"
    (tag / "fc7").mkdir(parents=True)
    (tag / "ds").mkdir()
    (tag / "ds" / "model_states.pt").write_bytes(b"copied verbatim")
    for rank in range(2):
        start, count = class_range(10, 2, rank)
        torch.save({"format": SHARD_FORMAT, "weight": torch.randn(count, 4), "momentum": None, "class_start": start,
                    "num_local": count, "num_classes": 10, "embedding_size": 4, "rank": rank, "world_size": 2,
                    "hyper": None, "sampler_rng": torch.zeros(8, dtype=torch.uint8), "margin": (1.0, 0.5, 0.0),
                    "scale": 64.0}, tag / "fc7" / fc7_shard_file_name(rank, 2))
    (tag / "meta.json").write_text(json.dumps({"format": "megaface.checkpoint.v1", "iteration": 3, "num_classes": 10,
                                               "embedding_size": 4, "world_size": 2, "class_ranges": []}))
    return {"images": str(images), "ckpt": str(root / "backbone.pt"), "bin": str(root / "lfw.bin"), "tag": str(tag),
            "root": str(root)}


SCRIPT = textwrap.dedent("""
    import json, sys
    from megaface.cli import main
    from tests.conftest import commands
    for label, argv in commands(json.loads(sys.argv[1])):
        print(f"== {label}", flush=True)
        assert main(argv) == 0, argv
""")


def test_long_commands_draw_a_bar_on_a_terminal(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path)
    rc, out = run_under_pty([sys.executable, "-c", SCRIPT, json.dumps(paths)],
                            env={"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                            timeout=240)
    assert rc == 0, out[-3000:]
    sections = out.split("== ")[1:]
    assert [s.split("\r\n")[0] for s in sections] == [label for label, _ in commands(paths)], out[-3000:]
    for (label, _), text in zip(commands(paths), sections, strict=True):
        total = {"pack": "8/8", "embed": "8/8", "eval lfw": "8/8", "fc7 reshard": "5/5"}[label]  # ds/, its file, 3 shards
        assert f"{label}: 100%|" in text and total in text and "\r" in text, text  # a tqdm bar, redrawn in place
        assert "done in" not in text, text  # no plain progress lines on a terminal


def test_long_commands_print_plain_lines_when_piped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = make_inputs(tmp_path)
    torch.set_num_threads(1)
    for label, argv in commands(paths):
        assert megaface_main(argv) == 0, argv
        err = capsys.readouterr().err
        assert "\r" not in err and "|" not in err, err
        finals = [line for line in err.splitlines() if line.startswith(f"{label}: ") and "done in" in line]
        assert len(finals) == 1, (label, err)


@pytest.mark.slow
def test_consolidate_shows_progress_over_the_partition_files(tmp_path: Path) -> None:
    from tests.conftest import (
        run_distributed,
        save_tiny_checkpoints,  # the ZeRO checkpoints its tests convert
    )

    run_distributed(save_tiny_checkpoints, 2, [str(tmp_path / "zero1")], [(1, "model")], timeout=300)
    script = ("import sys; from megaface.cli import main; "
              "sys.exit(main(['convert', 'consolidate', sys.argv[1], '-o', sys.argv[2]]))")
    rc, out = run_under_pty([sys.executable, "-c", script, str(tmp_path / "zero1"), str(tmp_path / "b.pt")],
                            env={"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}, timeout=240)
    assert rc == 0, out[-3000:]
    assert "consolidate: 100%|" in out and "2/2" in out, out
