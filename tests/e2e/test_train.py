"""`megaface train` end to end on 2 forked gloo ranks: loss goes down, resume is exact, ZeRO/bf16 work,
gradient accumulation matches a larger micro batch."""

from __future__ import annotations

import math
from pathlib import Path

import deepspeed  # noqa: F401  - imported before forking so that each rank starts in about a second
import pytest
import torch

from megaface.distributed import DistState
from tests.conftest import QUICKSTART, ROOT, run_distributed, tiny_args, train_worker


@pytest.mark.parametrize("variant", [(), pytest.param(("--data.workers=1", "--ds-config",
                                                            str(ROOT / "ds_configs" / "zero1_fp32.json")),
                                                           marks=pytest.mark.slow),
                                     # AdamW for both optimizers (sparse over Partial FC rows), polynomial lr
                                     ("--optim.name=adamw", "--optim.lr=0.01", "--optim.weight_decay=0.05",
                                      "--optim.schedule=polynomial", "--head.sample_rate=0.5"),
                                     # AdaFace: its norm EMA is in the shard files and must resume exactly
                                     ("--head.margin=adaface", "--head.sample_rate=0.5"),
                                     # sub-center ArcFace, K = 3 rows per class sampled together
                                     ("--head.subcenters=3", "--head.sample_rate=0.5"),
                                     # bf16 master weight (stochastic rounding keyed by the step) + bf16 momentum
                                     ("--head.weight_dtype=bf16", "--head.momentum_dtype=bf16",
                                      "--head.sample_rate=0.5")])
def test_two_ranks_fp32_loss_decreases_and_resume_is_exact(cache: Path, tmp_path: Path, variant: tuple) -> None:
    # 16 images seen again every 2 steps, plain softmax at a small scale: the loss falls within 8 steps
    easy = ("--head.margin=[1, 0, 0]", "--head.scale=8", "--data.synthetic.identities=8",
            "--data.synthetic.images_per_identity=2", *variant)
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


# ---- the step itself: accumulation, clipping, fp16 bookkeeping ------------------------------------------

def _steps_worker(state: DistState, micro: int, gas: int, clip: float) -> dict[str, torch.Tensor]:
    """Two global steps of 16 samples on a linear backbone (no BatchNorm: accumulation is exact)."""
    from torch import nn

    from megaface.config import load_config, resolve_ds_config
    from megaface.head import PartialFC
    from megaface.train.build import build_parts
    from megaface.train.step import train_step

    cfg = load_config(None, ["--train.max_steps=2", "--head.margin=[1, 0, 0]", "--head.scale=8"])
    ds = resolve_ds_config({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
                            "gradient_clipping": clip}, state.world_size, "cpu")
    torch.manual_seed(0)
    backbone = nn.Linear(12, 16)
    head = PartialFC(16, 10, margin=(1.0, 0.0, 0.0), scale=8.0, seed=0)
    parts = build_parts(cfg, ds, state, backbone, head, "fp32")
    data = torch.Generator().manual_seed(1)
    images = torch.randn(2, state.world_size, 8, 12, generator=data)
    labels = torch.randint(0, 10, (2, state.world_size, 8), generator=data)
    for step in range(2):
        for k in range(gas):  # rank r's 8 samples of this step, split into `gas` micro-batches
            rows = slice(k * micro, (k + 1) * micro)
            train_step(parts, images[step, state.rank, rows], labels[step, state.rank, rows])
    return {"backbone": backbone.weight.detach().clone(), "fc7": head.weight.detach().clone()}


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_accumulation_matches_a_larger_micro_batch(clip: float) -> None:
    accumulated = run_distributed(_steps_worker, 2, 4, 2, clip)
    single = run_distributed(_steps_worker, 2, 8, 1, clip)
    for rank in range(2):
        for key in ("backbone", "fc7"):
            torch.testing.assert_close(accumulated[rank][key], single[rank][key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(accumulated[0]["backbone"], accumulated[1]["backbone"])


def test_fc7_step_unscales_clips_and_skips() -> None:
    from megaface.distributed import DistState
    from megaface.head import PartialFC, ShardSGD
    from megaface.train.step import step_fc7

    def fresh(grad_scale: float) -> tuple[PartialFC, ShardSGD]:
        head = PartialFC(4, 6, seed=0)
        opt = ShardSGD(head, lr=1.0, momentum=0.0, weight_decay=0.0)
        head.weight.grad = torch.full_like(head.weight, 0.5 * grad_scale)  # global norm 0.5 * sqrt(24)
        return head, opt

    ref, opt = fresh(1.0)
    start = ref.weight.detach().clone()
    assert step_fc7(opt, DistState(), None, 0.0, True)  # fp32/bf16, no clipping: no norm at all
    torch.testing.assert_close(ref.weight.detach(), start - 0.5)
    scaled, opt = fresh(1024.0)  # fp16: gradients carry the loss scale
    assert step_fc7(opt, DistState(), 1024.0, 0.0, True)
    torch.testing.assert_close(scaled.weight.detach(), ref.weight.detach())
    for scale in (None, 1.0):  # the clip coefficient is applied on the device, with or without fp16
        clipped, opt = fresh(1.0)
        assert step_fc7(opt, DistState(), scale, 1.0, True)
        torch.testing.assert_close((start - clipped.weight.detach()).norm(), torch.tensor(1.0), rtol=1e-5,
                                   atol=1e-5)
    skipped, opt = fresh(1.0)
    assert not step_fc7(opt, DistState(), 1.0, 0.0, False)  # the engine skipped (fp16 overflow)
    torch.testing.assert_close(skipped.weight.detach(), start)
    inf, opt = fresh(float("inf"))
    assert not step_fc7(opt, DistState(), 1.0, 0.0, True)  # fp16: non-finite FC7 gradients skip too
    torch.testing.assert_close(inf.weight.detach(), start)


@pytest.mark.parametrize("ds_config, parallel", [
    ("zero1_bf16.json", "model"),
    pytest.param("zero2_fp32.json", "model", marks=pytest.mark.slow),
    pytest.param("zero3_bf16.json", "model", marks=pytest.mark.slow),
    pytest.param("zero3_fp32.json", "data", marks=pytest.mark.slow),
    pytest.param("zero1_fp32.json", "data", marks=pytest.mark.slow),
    pytest.param("zero2_offload_bf16.json", "model", marks=pytest.mark.slow),
])
def test_two_ranks_zero_and_bf16(cache: Path, tmp_path: Path, ds_config: str, parallel: str) -> None:
    args = tiny_args(cache, tmp_path / "run", 3, "--ds-config", str(ROOT / "ds_configs" / ds_config),
                     "--validation.interval=3", "--train.save_every=3", f"--head.parallel={parallel}")
    results = run_distributed(train_worker, 2, args)
    assert [r["code"] for r in results] == [0, 0]
    assert all(math.isfinite(x) for x in results[0]["losses"]) and len(results[0]["losses"]) == 3
    assert (tmp_path / "run" / "best_val.pt").is_file()
    from megaface.checkpoint import load_backbone

    model, meta = load_backbone(tmp_path / "run")
    assert meta["network"] == "mobilefacenet_tiny" and meta["zero_stage"] == int(ds_config[4])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quickstart_reaches_90_percent(tmp_path: Path) -> None:
    """The quickstart training as launch/quickstart.sh runs it (2 CPU ranks, torchrun); 3-15 min on 2 cores."""
    import os
    import re
    import subprocess
    import sys

    from tests.conftest import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "megaface", "train", "--config", str(QUICKSTART), "--output", str(tmp_path / "run"),
           f"--data.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    accuracies = [float(a) for a in re.findall(r"Accuracy-Flip: ([0-9.]+)", done.stdout)]
    assert accuracies and max(accuracies) >= 0.90, accuracies


def test_resume_is_exact_with_augmentations_on_the_device(cache: Path, tmp_path: Path) -> None:
    """Every augmentation on, a loader worker drawing the random numbers, the batch copied one ahead: the
    run resumed from its middle checkpoint continues bit for bit."""
    augment = ("--data.augment.crop_p=0.4", "--data.augment.crop_mode=resize", "--data.augment.lowres_p=0.4",
               "--data.augment.blur_p=0.4", "--data.augment.photometric_p=0.4", "--data.augment.hsv_p=0.4",
               "--data.augment.gray_p=0.2", "--data.workers=1", "--data.synthetic.identities=8",
               "--data.synthetic.images_per_identity=2", "--head.scale=8")
    full = run_distributed(train_worker, 2, tiny_args(cache, tmp_path / "a", 6, "--save-every", "3", *augment))
    assert [r["code"] for r in full] == [0, 0]
    resumed = run_distributed(train_worker, 2, tiny_args(cache, tmp_path / "b", 6, "--resume",
                                                         str(tmp_path / "a" / "checkpoints" / "step_00000003"),
                                                         *augment))
    assert [r["code"] for r in resumed] == [0, 0]
    assert resumed[0]["losses"] == full[0]["losses"][3:]


def test_host_and_device_input_paths_train_alike(cache: Path, tmp_path: Path) -> None:
    """data.prepare=host (float32 normalised by the loader, the former path) and the default device path (uint8
    to the device, flipped and normalised there) give the same losses bit for bit on the CPU."""
    args = ("--data.workers=1", "--data.synthetic.identities=8", "--data.synthetic.images_per_identity=2")
    device = run_distributed(train_worker, 2, tiny_args(cache, tmp_path / "d", 4, *args))
    host = run_distributed(train_worker, 2, tiny_args(cache, tmp_path / "h", 4, "--data.prepare=host", *args))
    assert [r["code"] for r in device + host] == [0] * 4
    assert len(device[0]["losses"]) == 4 and host[0]["losses"] == device[0]["losses"]
