"""`megaface train` end to end on 2 forked gloo ranks: loss goes down, resume is exact, ZeRO/bf16 work,
gradient accumulation matches a larger micro batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed  # noqa: F401  - imported before forking so that each rank starts in about a second
import pytest
import torch

from megaface.dist import DistState
from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "launch" / "configs" / "quickstart.yaml"


def tiny_args(cache: Path, output: Path, steps: int, *extra: str, micro: int = 4) -> list[str]:
    """A few-second run: 24 synthetic identities, micro batch `micro`, no workers, no tensorboard."""
    return ["--config", str(QUICKSTART), "--output", str(output), "--max-steps", str(steps),
            f"--ds.train_micro_batch_size_per_gpu={micro}", "--validation.interval=0",
            "--data.synthetic.identities=24", "--data.synthetic.images_per_identity=8",
            "--data.synthetic.val_pairs=40", f"--data.cache_dir={cache}", "--data.workers=0",
            "--train.log_every=1", "--train.tensorboard=false", "--train.keep_last=0", "--optim.warmup_steps=0",
            "--optim.milestones=[]", "--train.progress=off", *extra]


def train_worker(state: DistState, argv: list[str]) -> dict[str, Any]:
    """Rank body: run the CLI in this process; return its exit code and the per-iteration losses."""
    from megaface import logging_utils, train

    losses: list[float] = []
    original = logging_utils.TrainLogger.iteration

    def record(self, iteration, loss, *args, **kwargs):  # type: ignore[no-untyped-def]
        losses.append(loss)
        return original(self, iteration, loss, *args, **kwargs)

    logging_utils.TrainLogger.iteration = record
    try:
        code = train.main(argv)
    finally:
        logging_utils.TrainLogger.iteration = original
    return {"code": code, "losses": losses}


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def test_two_ranks_fp32_loss_decreases_and_resume_is_exact(cache: Path, tmp_path: Path) -> None:
    # 16 images seen again every 2 steps, plain softmax at a small scale: the loss falls within 8 steps
    easy = ("--head.margin=[1, 0, 0]", "--head.scale=8", "--data.synthetic.identities=8",
            "--data.synthetic.images_per_identity=2")
    full = run_distributed(train_worker, 2, tiny_args(cache, tmp_path / "a", 8, "--save-every", "4", *easy))
    assert [r["code"] for r in full] == [0, 0]
    losses = full[0]["losses"]
    assert full[1]["losses"] == losses  # the FC7 loss is the global-batch mean on every rank
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    ckpt = tmp_path / "a" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000004", "step_00000008"]
    resumed = run_distributed(train_worker, 2, tiny_args(cache, tmp_path / "b", 8, "--resume",
                                                         str(ckpt / "step_00000004"), *easy))
    assert [r["code"] for r in resumed] == [0, 0]
    assert resumed[0]["losses"] == losses[4:]  # bit-identical continuation on CPU fp32
