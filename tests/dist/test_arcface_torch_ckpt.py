"""`megaface convert import-arcface-torch` / `export-arcface-torch` against resume files written by arcface_torch's
own train_v2-style run (tests/fixtures/interop/arcface_torch/train_w2, rebuilt by make_arcface_torch.sh).

The reference losses in reference.json are arcface_torch's: the step after its save, on next_batch.pt, and the
step after that on the same batch. megaface resumes through its own resume path (load_checkpoint) on 1 and 2
gloo ranks and takes the same steps. Tests that run arcface_torch itself read MEGAFACE_ARCFACE_TORCH."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from megaface.cli import main as megaface_main
from tests.conftest import run_distributed

FIXTURE = Path(__file__).parents[1] / "fixtures" / "interop" / "arcface_torch" / "train_w2"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text()) if (FIXTURE / "reference.json").is_file() else {}
ARCFACE_TORCH = os.environ.get("MEGAFACE_ARCFACE_TORCH")


def convert(args: list[str]) -> int:
    """`megaface convert ARGS` through the top-level CLI (which prints errors and picks the exit status)."""
    return megaface_main(["convert", *args])


def batch_of(rank_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """next_batch.pt as arcface_torch feeds it, regrouped for `rank_count` ranks ([W, B, ...] in rank order)."""
    saved = torch.load(FIXTURE / "next_batch.pt", weights_only=True)
    images = (saved["images_uint8"].float() / 255 - 0.5) / 0.5
    flat_images, flat_labels = images.flatten(0, 1), saved["labels"].flatten()
    return flat_images.chunk(rank_count), flat_labels.chunk(rank_count)


def resume_and_step(state: Any, tag_dir: str, steps: int) -> list[float]:
    """megaface's resume of the imported checkpoint, then `steps` train steps on the saved batch."""
    from megaface.checkpoint import read_meta
    from megaface.config import load_config
    from megaface.config.ds_json import resolve_ds_config
    from megaface.head import PartialFC
    from megaface.models import build_model
    from megaface.train.build import build_margin, build_parts
    from megaface.train.checkpointing import load_checkpoint
    from megaface.train.schedule import schedule_lr, set_lr
    from megaface.train.step import train_step

    meta = read_meta(Path(tag_dir))
    config_file = Path(tag_dir).parent / f"config_rank{state.rank}.yaml"
    config_file.write_text(json.dumps(meta["config"]))  # JSON is YAML
    cfg = load_config(config_file)
    images, labels = batch_of(state.world_size)
    ds = resolve_ds_config({**meta["ds_config"], "train_micro_batch_size_per_gpu": len(labels[0])},
                           state.world_size, "cpu")
    model = build_model(cfg.model.network, embedding_size=cfg.model.embedding_size, **cfg.model.build_options())
    h = cfg.head
    head = PartialFC(int(meta["embedding_size"]), meta["num_classes"], margin=build_margin(h), scale=h.scale,
                     sample_rate=1.0, group=state.group)
    parts = build_parts(cfg, ds, state, model, head, "fp32")
    expected = {k: meta[k] for k in ("network", "embedding_size", "num_classes", "parallel")}
    trainer = load_checkpoint(parts, Path(tag_dir), expected, 0, "fp32", log=lambda _: None)
    losses = []
    for iteration in range(int(trainer["iteration"]), int(trainer["iteration"]) + steps):
        set_lr(parts, schedule_lr(iteration, cfg.optim, [], cfg.optim.warmup_steps, cfg.train.max_steps), 1.0)
        losses.append(float(train_step(parts, images[state.rank], labels[state.rank])))
    return losses


class Imported:
    """Checkpoints imported from the fixture, one per target world size, made on first use."""

    def __init__(self, root: Path) -> None:
        self.root, self.made = root, dict[int, Path]()

    def __getitem__(self, world: int) -> Path:
        if world not in self.made:
            out = self.root / f"w{world}" / "step_00000003"
            assert convert(["import-arcface-torch", str(FIXTURE), "-o", str(out), "--network", "mobilefacenet",
                         "--world-size", str(world)]) == 0
            self.made[world] = out
        return self.made[world]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    if not REFERENCE:
        pytest.skip(f"{FIXTURE} is absent: run tests/fixtures/interop/make_arcface_torch.sh")
    return Imported(tmp_path_factory.mktemp("imported"))


@pytest.mark.parametrize("imported_world", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_next_step_loss_matches_arcface_torch(imported: Imported, imported_world: int) -> None:
    """2 ranks, each fed its arcface_torch rank's images (BatchNorm statistics are per rank), from checkpoints
    imported for 2 ranks and for 1 (resharded on load): the next step within 1e-4 of arcface_torch's, the one
    after (momentum, lr, clipping, weight decay in play) within 1e-3 (arcface_torch all-reduces the backbone
    gradients in fp16: DDP's fp16_compress_hook)."""
    losses = run_distributed(resume_and_step, 2, str(imported[imported_world]), 2, timeout=300)
    assert all(rank_losses == losses[0] for rank_losses in losses)  # the global-batch loss on every rank
    next_loss, following = losses[0]
    assert abs(next_loss - REFERENCE["next_loss"]) < 1e-4, (next_loss, REFERENCE["next_loss"])
    print(f"megaface {next_loss:.6f} {following:.6f} arcface_torch {REFERENCE['next_loss']:.6f} "
          f"{REFERENCE['following_loss']:.6f}")
    assert abs(following - REFERENCE["following_loss"]) < 1e-3, (following, REFERENCE["following_loss"])


def test_import_writes_the_layout(imported: Imported) -> None:
    from megaface.checkpoint.fc7_shards import load_checkpoint_shards, merge_shards

    meta = json.loads((imported[2] / "meta.json").read_text())
    assert (meta["iteration"], meta["world_size"], meta["num_classes"]) == (3, 2, 2001)
    assert meta["class_ranges"] == [[0, 1001], [1001, 1000]]
    assert meta["config"]["optim"]["schedule"] == "polynomial" and meta["config"]["model"]["bn_eps"] == 1e-5
    merged = merge_shards(*load_checkpoint_shards(imported[2]))
    theirs = [torch.load(FIXTURE / f"checkpoint_gpu_{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(merged["weight"], torch.cat([t["state_dict_softmax_fc"]["weight"] for t in theirs]))
    fc7_index = theirs[0]["state_optimizer"]["param_groups"][1]["params"][0]
    assert torch.equal(merged["momentum"], torch.cat([t["state_optimizer"]["state"][fc7_index]["momentum_buffer"]
                                                      for t in theirs]))


def test_missing_rank_and_wrong_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "checkpoint_gpu_1.pt").write_bytes((FIXTURE / "checkpoint_gpu_1.pt").read_bytes())
    assert convert(["import-arcface-torch", str(tmp_path), "-o", str(tmp_path / "out"), "--network",
                 "mobilefacenet"]) == 2
    assert "checkpoint_gpu_0.pt is missing (found ranks [1])" in capsys.readouterr().err
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "checkpoint_gpu_0.pt")
    assert convert(["import-arcface-torch", str(tmp_path), "-o", str(tmp_path / "out"), "--network",
                 "mobilefacenet"]) == 2
    assert "lacks ['epoch', 'global_step'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def exported(imported: Imported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """arcface_torch files for 2 ranks exported from the checkpoint imported for 2 ranks."""
    out = tmp_path_factory.mktemp("exported") / "arcface_out"
    assert convert(["export-arcface-torch", str(imported[2]), "-o", str(out), "--world-size", "2"]) == 0
    return out


def test_round_trip_gives_back_arcface_torch_files(exported: Path) -> None:
    """import -> export reproduces arcface_torch's own files: weights and momentum bit for bit, schedule state.
    The one exception: the momentum of mobilefacenet's embedding BatchNorm scale, which megaface holds fixed."""
    for rank in range(2):
        theirs = torch.load(FIXTURE / f"checkpoint_gpu_{rank}.pt", weights_only=True)
        ours = torch.load(exported / f"checkpoint_gpu_{rank}.pt", weights_only=True)
        assert (ours["epoch"], ours["global_step"]) == (theirs["epoch"], theirs["global_step"])
        assert list(ours["state_dict_backbone"]) == list(theirs["state_dict_backbone"])
        rank0 = torch.load(FIXTURE / "checkpoint_gpu_0.pt", weights_only=True)["state_dict_backbone"]
        for key, value in theirs["state_dict_backbone"].items():
            # BatchNorm running statistics differ per rank there (DDP, broadcast_buffers=False); a megaface
            # checkpoint holds one backbone, rank 0's
            expected = rank0[key] if key.endswith(("running_mean", "running_var")) else value
            assert torch.equal(ours["state_dict_backbone"][key], expected), key
        assert torch.equal(ours["state_dict_softmax_fc"]["weight"], theirs["state_dict_softmax_fc"]["weight"])
        names = [k for k in theirs["state_dict_backbone"] if not k.endswith(("running_mean", "running_var",
                                                                               "num_batches_tracked"))]
        fixed = {names.index("features.layers.3.weight")}
        theirs_opt, ours_opt = theirs["state_optimizer"], ours["state_optimizer"]
        assert set(ours_opt["state"]) == set(theirs_opt["state"]) - fixed
        for index, value in ours_opt["state"].items():
            assert torch.equal(value["momentum_buffer"], theirs_opt["state"][index]["momentum_buffer"]), index
        for ours_group, theirs_group in zip(ours_opt["param_groups"], theirs_opt["param_groups"], strict=True):
            assert ours_group["params"] == theirs_group["params"]
            for key in ("lr", "initial_lr", "momentum", "weight_decay", "dampening", "nesterov"):
                assert ours_group[key] == pytest.approx(theirs_group[key], rel=1e-12), key
        for key in ("last_epoch", "_step_count", "warmup_iters", "total_iters", "power"):
            assert ours["state_lr_scheduler"][key] == theirs["state_lr_scheduler"][key], key
        assert ours["state_lr_scheduler"]["base_lrs"] == pytest.approx(theirs["state_lr_scheduler"]["base_lrs"])
    assert list(torch.load(exported / "model.pt", weights_only=True)) == list(theirs["state_dict_backbone"])


def arcface_torch_resumes(state: Any, root: str, output: str) -> list[float]:
    """arcface_torch's train_v2 resume statements on `output`'s files, then two of its steps on next_batch."""
    from tests.support.arcface_torch_fixtures import build_train_v2, import_peer

    backbone, module_partial_fc, opt, lr_scheduler, step = build_train_v2(import_peer(Path(root)))
    dict_checkpoint = torch.load(os.path.join(output, f"checkpoint_gpu_{state.rank}.pt"))
    backbone.module.load_state_dict(dict_checkpoint["state_dict_backbone"])
    module_partial_fc.load_state_dict(dict_checkpoint["state_dict_softmax_fc"])
    opt.load_state_dict(dict_checkpoint["state_optimizer"])
    lr_scheduler.load_state_dict(dict_checkpoint["state_lr_scheduler"])
    saved = torch.load(FIXTURE / "next_batch.pt", weights_only=True)
    images, labels = saved["images_uint8"][state.rank], saved["labels"][state.rank]
    return [step(images, labels), step(images, labels)]


@pytest.mark.skipif(not ARCFACE_TORCH, reason="MEGAFACE_ARCFACE_TORCH (InsightFace's recognition/arcface_torch "
                                              "folder) is not set")
def test_arcface_torch_resumes_the_export(exported: Path) -> None:
    """arcface_torch's own resume code loads the exported files and its next step gives its own loss."""
    losses = run_distributed(arcface_torch_resumes, 2, ARCFACE_TORCH, str(exported), timeout=300)
    next_loss, following = losses[0]
    print(f"arcface_torch resumed from megaface's export: {next_loss:.6f} {following:.6f}")
    assert abs(next_loss - REFERENCE["next_loss"]) < 1e-4, (next_loss, REFERENCE["next_loss"])
    assert abs(following - REFERENCE["following_loss"]) < 1e-3, (following, REFERENCE["following_loss"])


def test_exported_schedule_is_the_trainers() -> None:
    from megaface.convert.arcface_torch_ckpt import polynomial_warmup_lr
    from megaface.train.schedule import polynomial_lr

    for done in range(0, 25):
        assert polynomial_warmup_lr(done, 0.1, 3, 20, 2.0) == polynomial_lr(done, 0.1, 3, 20, 2.0)


def test_export_for_three_ranks_splits_fc7_as_arcface_torch(imported: Imported, tmp_path: Path) -> None:
    """3 ranks over 2001 classes: 667 rows each, in class order; the momentum rows go with them."""
    assert convert(["export-arcface-torch", str(imported[2]), "-o", str(tmp_path / "w3"), "--world-size", "3"]) == 0
    ours = [torch.load(tmp_path / "w3" / f"checkpoint_gpu_{r}.pt", weights_only=True) for r in range(3)]
    theirs = [torch.load(FIXTURE / f"checkpoint_gpu_{r}.pt", weights_only=True) for r in range(2)]
    assert [o["state_dict_softmax_fc"]["weight"].shape[0] for o in ours] == [667, 667, 667]
    def rows(files: list[dict], key: str) -> torch.Tensor:
        if key == "weight":
            return torch.cat([f["state_dict_softmax_fc"]["weight"] for f in files])
        index = files[0]["state_optimizer"]["param_groups"][1]["params"][0]
        return torch.cat([f["state_optimizer"]["state"][index]["momentum_buffer"] for f in files])
    for key in ("weight", "momentum"):
        assert torch.equal(rows(ours, key), rows(theirs, key)), key


def test_wrong_network_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not REFERENCE:
        pytest.skip(f"{FIXTURE} is absent: run tests/fixtures/interop/make_arcface_torch.sh")
    assert convert(["import-arcface-torch", str(FIXTURE), "-o", str(tmp_path / "out"), "--network", "iresnet50"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "iresnet50" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_megaface_train_resumes_the_import(imported: Imported, tmp_path: Path) -> None:
    """The `megaface train` command itself resumes the imported checkpoint (1 rank, synthetic data of the same
    2001 classes) and trains on from arcface_torch's step 3."""
    import shutil
    import subprocess
    import sys

    import yaml

    run = tmp_path / "run"
    shutil.copytree(imported[1], run / "checkpoints" / "step_00000003")
    meta = json.loads((imported[1] / "meta.json").read_text())
    config = json.loads(json.dumps(meta["config"]))
    config["data"].update(source="synthetic", cache_dir=str(tmp_path / "cache"), workers=0)
    config["data"]["synthetic"].update(identities=2001, images_per_identity=1, val_pairs=0)
    config["train"].update(output_dir=str(run), log_every=1, tensorboard=False)
    config["validation"]["interval"] = 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "ds.json").write_text(json.dumps({**meta["ds_config"], "train_micro_batch_size_per_gpu": 8}))
    result = subprocess.run([sys.executable, "-m", "megaface", "train", "--config", str(tmp_path / "config.yaml"),
                             "--ds-config", str(tmp_path / "ds.json"), "--resume", "latest", "--max-steps", "5"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "at iteration 3" in result.stdout and "train: iter 4, loss" in result.stdout, result.stdout[-2000:]
    assert (run / "checkpoints" / "step_00000005" / "meta.json").is_file()
