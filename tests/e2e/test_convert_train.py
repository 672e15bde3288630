"""`megaface convert` on the checkpoint of a real `megaface train` run (2 CPU ranks, torchrun, ZeRO-1 fp32,
tiny MobileFaceNet on synthetic identities), and resuming such a run on another world size.

The resume cases (slow) check the first loss after `megaface train --resume` on W' ranks against a
single-process reference computed from the checkpoint alone: consolidated backbone + merged FC7 on the same
global batch (the loader's global batches do not depend on the world size when the global batch size is
kept). The backbone runs in train mode on W' chunks of the batch, as W' ranks would (BatchNorm normalises
with per-rank batch statistics). The same reference with the old chunking reproduces the loss the
uninterrupted old run logged for that step, so both sides are pinned to the same checkpoint contents.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megaface.cli import main as megaface_main
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH, SAVE_AT, STEPS = 12, 3, 4
_LOSS_LINE = re.compile(r"train: iter (\d+), loss ([-+0-9.eEinfa]+)")


def _train(output: Path, cache: Path, world_size: int, max_steps: int, resume: str | None = None,
           ds_config: str = "zero1_fp32.json") -> dict[int, float]:
    """Run `megaface train` on `world_size` CPU ranks; return {iteration: logged loss}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
           f"--master_port={free_port()}", "-m", "megaface", "train",
           "--config", str(ROOT / "launch/configs/quickstart.yaml"), "--ds-config", str(ROOT / "ds_configs" / ds_config),
           "--output", str(output), "--max-steps", str(max_steps), "--save-every", str(SAVE_AT),
           f"--ds.train_micro_batch_size_per_gpu={GLOBAL_BATCH // world_size}", "--validation.interval=0",
           "--data.synthetic.identities=24", "--data.synthetic.images_per_identity=4",
           "--data.synthetic.val_pairs=20", f"--data.cache_dir={cache}", "--data.workers=0",
           "--train.log_every=1", "--train.tensorboard=false", "--train.keep_last=0"]
    if resume:
        cmd += ["--resume", resume]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"megaface train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return {int(m.group(1)): float(m.group(2)) for m in _LOSS_LINE.finditer(proc.stdout + proc.stderr)}


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A 2-rank run of STEPS iterations with checkpoints at SAVE_AT and STEPS (about 30-60 s here)."""
    root = tmp_path_factory.mktemp("train2")
    losses = _train(root / "run", root / "cache", 2, STEPS)
    return root, losses


def _tag(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


# ---- the CLI on a real training checkpoint -----------------------------------------------------------------

def test_cli_inspect(run2, capsys):
    root, _ = run2
    assert megaface_main(["convert", "inspect", str(root / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(_tag(root / "run", STEPS))
    assert (report["iteration"], report["network"], report["zero_stage"], report["precision"]) == \
        (STEPS, "mobilefacenet_tiny", 1, "fp32")
    assert report["num_classes"] == 24 and report["embedding_size"] == 128 and report["world_size"] == 2
    assert [(s["rank"], s["class_start"], s["num_local"]) for s in report["fc7"]["shards"]] == [(0, 0, 12), (1, 12, 12)]
    assert report["config"]["model"]["network"] == "mobilefacenet_tiny"
    assert megaface_main(["convert", "inspect", str(_tag(root / "run", SAVE_AT))]) == 0
    text = capsys.readouterr().out
    assert "iteration        3" in text and "rank 1    classes [12, 24)" in text


def test_cli_consolidate_matches_deepspeed(run2, tmp_path, capsys):
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megaface.models import build_model

    root, _ = run2
    out = tmp_path / "backbone.pt"
    assert megaface_main(["convert", "consolidate", str(root / "run" / "checkpoints"), "-o", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = get_fp32_state_dict_from_zero_checkpoint(str(_tag(root / "run", STEPS)), tag="ds")
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)
    build_model("mobilefacenet_tiny").load_state_dict(state, strict=True)
    assert json.loads(Path(f"{out}.json").read_text())["iteration"] == STEPS


def test_cli_fc7_merge_and_reshard(run2, tmp_path, capsys):
    from megaface.checkpoint.fc7_shards import load_checkpoint_shards

    root, _ = run2
    tag = _tag(root / "run", STEPS)
    assert megaface_main(["convert", "fc7", str(tag), "--merge", "-o", str(tmp_path / "fc7.pt")]) == 0
    merged = torch.load(tmp_path / "fc7.pt", weights_only=True)
    shards, _ = load_checkpoint_shards(tag)
    assert merged["weight"].shape == (24, 128) and merged["momentum"].shape == (24, 128)
    assert torch.equal(merged["weight"], torch.cat([s["weight"] for s in shards]))
    assert megaface_main(["convert", "fc7", str(tag), "--reshard", "3", "-o", str(tmp_path / "w3")]) == 0
    resharded, _ = load_checkpoint_shards(tmp_path / "w3")
    assert [s["num_local"] for s in resharded] == [8, 8, 8]
    assert torch.equal(torch.cat([s["momentum"] for s in resharded]), merged["momentum"])


def test_cli_errors_name_the_file_and_leave_no_output(run2, tmp_path, capsys):
    import shutil

    root, _ = run2
    assert megaface_main(["convert", "inspect", str(tmp_path / "nowhere")]) == 2
    assert "nowhere' does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(_tag(root / "run", STEPS), broken)
    victim = broken / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    out_dir = tmp_path / "out"
    assert megaface_main(["convert", "consolidate", str(broken), "-o", str(out_dir / "b.safetensors")]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "truncated" in err
    assert not out_dir.exists() or list(out_dir.iterdir()) == []
    (broken / "fc7" / "shard_00001_of_00002.pt").unlink()
    assert megaface_main(["convert", "inspect", str(broken)]) == 1  # still reports, and names the problem
    captured = capsys.readouterr().out
    assert "iteration        4" in captured and "PROBLEM" in captured and "shard_00001_of_00002.pt" in captured
    assert megaface_main(["convert", "fc7", str(broken), "--reshard", "3", "-o", str(out_dir / "w3")]) == 2
    err = capsys.readouterr().err  # the digest check names the damaged files before anything is read
    assert "inspect --verify" in err and "--no-verify" in err
    assert not (out_dir / "w3").exists() and not out_dir.exists() or list(out_dir.iterdir()) == []
    assert megaface_main(["convert", "consolidate", str(_tag(root / "run", STEPS)), "-o", str(out_dir / "b.pt"),
                         "--network", "iresnet18"]) == 2
    assert "holds a 'mobilefacenet_tiny' backbone, not 'iresnet18'" in capsys.readouterr().err


# ---- resume on another world size (slow: two more training runs per direction) -------------------------

def _reference_loss(tag_dir: Path, world_size: int) -> float:
    """The global-batch loss after `tag_dir` on `world_size` ranks, from the checkpoint files alone."""
    from megaface.checkpoint.fc7_shards import load_checkpoint_shards, merge_shards
    from megaface.convert.consolidate import consolidate_state_dict
    from megaface.data import TrainLoader, build_dataset
    from megaface.data.synthetic import ensure_synthetic
    from megaface.head import PartialFC
    from megaface.models import build_model

    meta = json.loads((tag_dir / "meta.json").read_text())
    cfg = meta["config"]
    s = cfg["data"]["synthetic"]
    pack_dir, _ = ensure_synthetic(Path(cfg["data"]["cache_dir"]), s["identities"], s["images_per_identity"],
                                   s["val_pairs"], s["seed"])
    loader = TrainLoader(build_dataset("recordio", str(pack_dir)), GLOBAL_BATCH, 0, 1, seed=cfg["data"]["seed"],
                         workers=0, flip=cfg["data"]["flip"], normalize=cfg["data"]["normalize"])
    loader.load_state_dict(torch.load(tag_dir / "trainer" / "rank_00000.pt", weights_only=False)["loader"])
    images, labels = next(iter(loader))
    backbone = build_model(meta["network"])
    backbone.load_state_dict(consolidate_state_dict(tag_dir)[0])
    head = PartialFC(meta["embedding_size"], meta["num_classes"], margin=tuple(cfg["head"]["margin"]),
                     scale=cfg["head"]["scale"])
    with torch.no_grad():
        head.weight.copy_(merge_shards(load_checkpoint_shards(tag_dir)[0])["weight"])
        embeddings = torch.cat([backbone.train()(chunk) for chunk in images.chunk(world_size)])
        return float(head(embeddings, labels))


@pytest.mark.slow
@pytest.mark.parametrize("src,dst", [(2, 3), (3, 2)])
def test_resume_on_another_world_size(run2, tmp_path, src, dst):
    if src == 2:
        root, old_losses = run2
        old_run = root / "run"
    else:
        old_run = tmp_path / "run3"
        old_losses = _train(old_run, tmp_path / "cache", 3, STEPS)
    tag = _tag(old_run, SAVE_AT)
    # the reference method reproduces the old run's own next loss ...
    assert _reference_loss(tag, src) == pytest.approx(old_losses[SAVE_AT], rel=1e-5)
    # ... and the resumed run on dst ranks starts exactly where the checkpoint says
    new_losses = _train(tmp_path / f"resumed{dst}", tmp_path / "cache", dst, SAVE_AT + 1, resume=str(tag))
    assert sorted(new_losses) == [SAVE_AT]
    assert new_losses[SAVE_AT] == pytest.approx(_reference_loss(tag, dst), rel=1e-5)

