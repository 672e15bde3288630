"""benchmarks/peer_step.py without arcface_torch: the --arcface-torch check, the CPU patches, the summary
arithmetic, megaface's side at tiny sizes; the peer itself only when MEGAFACE_ARCFACE_TORCH names the folder."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from benchmarks import peer_step

ARCFACE_TORCH = os.environ.get("MEGAFACE_ARCFACE_TORCH")


def test_missing_flag_names_it_and_the_folder(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        peer_step._parse(["--networks", "mobilefacenet"])
    err = capsys.readouterr().err
    assert "--arcface-torch DIR is required" in err and "recognition/arcface_torch" in err


def test_wrong_folder_says_what_is_missing(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "losses.py").write_text("")
    with pytest.raises(SystemExit):
        peer_step._parse(["--arcface-torch", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--arcface-torch {tmp_path}" in err and "recognition/arcface_torch" in err
    assert "backbones/__init__.py, partial_fc_v2.py, lr_scheduler.py not found" in err


def test_folder_with_the_modules_passes_and_megaface_only_needs_none(tmp_path) -> None:
    for name in peer_step.PEER_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert peer_step._parse(["--arcface-torch", str(tmp_path)]).arcface_torch == str(tmp_path.resolve())
    args = peer_step._parse(["--trainers", "megaface,megaface_cl"])
    assert args.trainers == ["megaface", "megaface_cl"] and args.arcface_torch is None
    with pytest.raises(SystemExit):
        peer_step._parse(["--trainers", "megaface", "--networks", "resnet9"])


def test_cuda_is_the_identity_only_inside() -> None:
    original = torch.Tensor.cuda
    x = torch.zeros(2)
    with peer_step.cuda_as_identity():
        assert x.cuda() is x
    assert torch.Tensor.cuda is original


def test_scheduler_accepts_verbose_only_inside() -> None:
    class Old(torch.optim.lr_scheduler.LRScheduler):  # the constructor arcface_torch's scheduler has
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            super().__init__(optimizer, last_epoch=-1, verbose=False)

        def get_lr(self) -> list[float]:
            return [group["lr"] for group in self.optimizer.param_groups]

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    with peer_step.scheduler_without_verbose():
        assert Old(opt).get_last_lr() == [0.5]
    with pytest.raises(TypeError):
        Old(opt)


def test_summary_takes_the_slowest_wall_and_the_summed_cpu() -> None:
    case = {"classes": 10, "sample_rate": 0.5, "batch": 4, "world_size": 2, "steps": 2}

    def rank(wall: float, cpu: float) -> dict:
        return {"totals": {"megaface": {"wall": wall, "cpu": cpu}, "peer": {"wall": 2 * wall, "cpu": 3 * cpu}},
                "last_loss": {"megaface": 1.0, "peer": 2.0}}
    line = peer_step.summarize("mobilefacenet", case, [rank(1.0, 1.0), rank(2.0, 1.0)])
    assert line["trainers"]["megaface"]["samples_per_s"] == 8.0       # 16 samples / slowest 2 s
    assert line["trainers"]["megaface"]["samples_per_cpu_s"] == 8.0   # 16 samples / (1 + 1) CPU-s
    assert line["ratio"]["megaface/peer"] == {"wall": 2.0, "cpu": 3.0}
    assert "megaface_cl/peer" not in line["ratio"]


def test_megaface_backbone_cpu_tiny() -> None:
    case = {"arcface_torch": None, "trainers": ["megaface", "megaface_cl"], "networks": ["mobilefacenet"],
            "batch": 2, "embedding_size": 64, "backbone_reps": 1}
    threads = torch.get_num_threads()
    try:
        (line,) = peer_step.backbone_cpu(case)
    finally:
        torch.set_num_threads(threads)
    assert set(line["backbone_fwd_bwd_cpu_ms"]) == {"megaface", "megaface_cl"} and line["ratio"] == {}
    assert all(v > 0 for v in line["backbone_fwd_bwd_cpu_ms"].values())


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    assert peer_step.main(argv) == 0
    return [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]


@pytest.mark.slow
def test_megaface_side_two_ranks_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _run(["--trainers", "megaface,megaface_cl", "--networks", "mobilefacenet", "--classes", "64",
                  "--batch", "2", "--embedding-size", "64", "--warmup", "0", "--steps", "1",
                  "--backbone-reps", "0"], capsys)
    step, summary = lines
    assert set(step["trainers"]) == {"megaface", "megaface_cl"} and summary["summary"]
    assert all(math.isfinite(t["last_loss"]) and t["samples_per_cpu_s"] > 0 for t in step["trainers"].values())


@pytest.mark.slow
@pytest.mark.skipif(not ARCFACE_TORCH, reason="set MEGAFACE_ARCFACE_TORCH to InsightFace's "
                                              "recognition/arcface_torch folder to run the peer")
def test_peer_against_megaface_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _run(["--arcface-torch", str(ARCFACE_TORCH), "--networks", "mobilefacenet", "--classes", "64",
                  "--batch", "2", "--warmup", "0", "--steps", "1", "--backbone-reps", "1"], capsys)
    backbone, step, summary = lines
    assert set(backbone["ratio"]) == {"megaface/peer", "megaface_cl/peer"}
    assert math.isfinite(step["trainers"]["peer"]["last_loss"]) and "megaface/peer" in summary["step_ratio"][
        "mobilefacenet"]
