"""`megaface convert` on real DeepSpeed checkpoints: 2 gloo ranks train a tiny MobileFaceNet + model-parallel
FC7 for two steps under ZeRO 0/1/2/3 (fp32, SGD) and save in the megaface layout (CONTRACTS.md). The
consolidated backbone is checked against the live engine weights and against DeepSpeed's zero_to_fp32.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megaface.checkpoint.fc7_shards import load_checkpoint_shards
from megaface.checkpoint.layout import (
    CHECKPOINT_FORMAT,
    CHECKPOINTS_DIR,
    DS_DIR,
    FC7_DIR,
    LATEST,
    META_FILE,
    TRAINER_DIR,
    fc7_shard_file_name,
    tag_for,
    trainer_file_name,
)
from megaface.convert.consolidate import consolidate, consolidate_state_dict
from megaface.convert.fc7 import merge_checkpoint, reshard_checkpoint
from megaface.convert.inspect import format_report, inspect_checkpoint
from megaface.distributed.ds_shm import skip_shm_build
from tests.conftest import run_distributed

NETWORK, NUM_CLASSES, STEPS = "mobilefacenet_tiny", 7, 2


def _ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def _full_backbone_state(engine, stage: int) -> dict[str, torch.Tensor]:
    """The live backbone weights on every rank (ZeRO-3 gathers its partitions)."""
    if stage != 3:
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def save_tiny_checkpoints(state, roots: list[str], runs: list[tuple[int, str]]) -> list[dict]:
    """One tiny run per (ZeRO stage, head parallelism) in the same process group (forking once is the slow
    part)."""
    skip_shm_build()  # as the trainer does: no C++ compiler needed
    return [save_bf16_mlp(state, root, stage) if parallel == "bf16" else
            save_tiny_checkpoint(state, root, stage, parallel) for root, (stage, parallel) in zip(roots, runs, strict=False)]


def save_bf16_mlp(state, output_dir: str, stage: int) -> dict:
    """A bf16 DeepSpeed checkpoint (DeepSpeed part only) of a BatchNorm-free MLP: DeepSpeed's bf16 engine
    on CPU cannot run BatchNorm (fp32 running statistics meet bf16 activations), which every megaface
    network has. Returns the live bf16 module weights."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    config = {**_ds_config(stage), "bf16": {"enabled": True}}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    gen = torch.Generator().manual_seed(state.rank)
    for _ in range(STEPS):
        loss = engine(torch.randn(4, 24, generator=gen).bfloat16()).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(Path(output_dir) / "tag"), tag=DS_DIR, save_latest=False)
    return {"module": _full_backbone_state(engine, stage)}


def save_tiny_checkpoint(state, output_dir: str, stage: int, parallel: str = "model") -> dict:
    """Train STEPS steps on 2 ranks and save `output_dir/checkpoints/step_0000000N/` like the trainer does.

    parallel="data": the replicated head goes into the engine next to the backbone (megaface.train.build's
    DataParallelFace), so DeepSpeed saves both and there are no fc7/ shards."""
    import deepspeed

    from megaface.checkpoint.fc7_shards import shard_state_dict
    from megaface.head import PartialFC, ShardSGD
    from megaface.models import build_model
    from megaface.train.build import DataParallelFace

    torch.manual_seed(0)
    backbone = build_model(NETWORK)
    head = PartialFC(backbone.embedding_size, NUM_CLASSES, scale=32.0, parallel=parallel)
    module = DataParallelFace(backbone, head) if parallel == "data" else backbone
    fc7_opt = ShardSGD(head, lr=0.1, momentum=0.9) if parallel == "model" else None
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=_ds_config(stage),
                                      dist_init_required=False)
    live_head = engine.module.head if parallel == "data" else head
    gen = torch.Generator().manual_seed(state.rank)
    for _ in range(STEPS):
        images = torch.randn(2, 3, 112, 112, generator=gen)
        labels = torch.randint(0, NUM_CLASSES, (2,), generator=gen)
        loss = live_head(engine(images), labels)
        engine.backward(loss)
        engine.step()
        if fc7_opt is not None:
            fc7_opt.step()
            fc7_opt.zero_grad()
    tag_dir = Path(output_dir) / CHECKPOINTS_DIR / tag_for(STEPS)
    engine.save_checkpoint(str(tag_dir), tag=DS_DIR, save_latest=False)
    (tag_dir / TRAINER_DIR).mkdir(exist_ok=True)
    if fc7_opt is not None:
        (tag_dir / FC7_DIR).mkdir(exist_ok=True)
        torch.save(shard_state_dict(head, fc7_opt), tag_dir / FC7_DIR / fc7_shard_file_name(state.rank, state.world_size))
    torch.save({"iteration": STEPS}, tag_dir / TRAINER_DIR / trainer_file_name(state.rank))
    if state.rank == 0:
        ranges = [[0, 4], [4, 3]]
        meta = {"format": CHECKPOINT_FORMAT, "iteration": STEPS, "network": NETWORK,
                "embedding_size": backbone.embedding_size, "num_classes": NUM_CLASSES,
                "world_size": state.world_size, "class_ranges": ranges, "zero_stage": stage,
                "precision": "fp32", "parallel": parallel, "normalize": "arcface_torch",
                "config": {"model": {"network": NETWORK}}, "ds_config": _ds_config(stage)}
        (tag_dir / META_FILE).write_text(json.dumps(meta))
        (tag_dir.parent / LATEST).write_text(tag_dir.name + "\n")
    live = _full_backbone_state(engine, stage)
    if parallel == "data":
        weight = live["head.weight"]
        return {"backbone": {k[len("backbone."):]: v for k, v in live.items() if k.startswith("backbone.")},
                "weight": weight, "momentum": None}
    return {"backbone": live, "weight": head.weight.detach().clone(),
            "momentum": fc7_opt.momentum_buffer().detach().clone()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{stage: (output dir, per-rank live results)} for ZeRO 0-3 and "data" (ZeRO-2, data-parallel head)."""
    import deepspeed  # noqa: F401 - imported before forking, so the ranks start quickly

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    runs = [(0, "model"), (1, "model"), (2, "model"), (3, "model"), (2, "data"), (0, "bf16"), (1, "bf16"),
            (3, "bf16")]
    keys = [0, 1, 2, 3, "data", "bf16-0", "bf16-1", "bf16-3"]
    roots = [tmp_path_factory.mktemp(f"zero{stage}_{parallel}") for stage, parallel in runs]
    per_rank = run_distributed(save_tiny_checkpoints, 2, [str(r) for r in roots], runs, timeout=300)
    return {key: (root, [rank_results[i] for rank_results in per_rank])
            for i, (key, root) in enumerate(zip(keys, roots, strict=False))}


def _deepspeed_fp32(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), tag=DS_DIR)


def _assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_consolidate_equals_live_weights_and_deepspeed(checkpoints, stage, tmp_path):
    root, results = checkpoints[stage]
    state, meta = consolidate_state_dict(root)
    live = results[0]["backbone"]
    _assert_same_state(state, live)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert meta["network"] == NETWORK and meta["zero_stage"] == stage and meta["embedding_size"] == 128
    if stage > 0:  # DeepSpeed's zero_to_fp32 only handles ZeRO 1-3
        _assert_same_state(state, _deepspeed_fp32(root / CHECKPOINTS_DIR / tag_for(STEPS)))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_consolidated_file_loads_without_deepspeed(checkpoints, suffix, tmp_path):
    from megaface.checkpoint import load_backbone
    from megaface.models import build_model

    root, results = checkpoints[3]
    out = consolidate(root / "checkpoints", tmp_path / f"backbone{suffix}")
    if suffix == ".pt":
        plain = torch.load(out, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        plain = load_file(str(out))
    model = build_model(NETWORK)
    model.load_state_dict(plain, strict=True)
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["network"] == NETWORK and sidecar["normalize"] == "arcface_torch"
    loaded, meta = load_backbone(out)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_inspect_reports_layout(checkpoints):
    root, _ = checkpoints[2]
    report = inspect_checkpoint(root)
    assert report["iteration"] == STEPS and report["network"] == NETWORK and report["zero_stage"] == 2
    assert report["fc7"]["world_size"] == 2
    assert [(s["class_start"], s["num_local"]) for s in report["fc7"]["shards"]] == [(0, 4), (4, 3)]
    assert "optimizer state partitioned" in report["deepspeed"]["layout"]
    json.dumps(report)  # --json must be serialisable
    text = format_report(report)
    assert "rank 1    classes [4, 7)" in text and "mobilefacenet_tiny" in text


def test_fc7_merge_and_reshard_checkpoint(checkpoints, tmp_path):
    root, results = checkpoints[1]
    tag_dir = root / CHECKPOINTS_DIR / tag_for(STEPS)
    merged = torch.load(merge_checkpoint(tag_dir, tmp_path / "fc7.pt"), weights_only=True)
    assert torch.equal(merged["weight"], torch.cat([r["weight"] for r in results]))
    assert torch.equal(merged["momentum"], torch.cat([r["momentum"] for r in results]))
    assert merged["network"] == NETWORK and merged["num_classes"] == NUM_CLASSES
    out = reshard_checkpoint(tag_dir, 3, tmp_path / "w3")
    states, _ = load_checkpoint_shards(out)
    assert [(s["class_start"], s["num_local"]) for s in states] == [(0, 3), (3, 2), (5, 2)]
    assert torch.equal(torch.cat([s["weight"] for s in states]), merged["weight"])
    meta = json.loads((out / META_FILE).read_text())
    assert meta["fc7_world_size"] == 3 and meta["class_ranges"] == [[0, 3], [3, 2], [5, 2]]
    assert sorted(p.name for p in (out / DS_DIR).iterdir()) == sorted(p.name for p in (tag_dir / DS_DIR).iterdir())
    # the copy is a complete checkpoint: its backbone consolidates to the same weights
    _assert_same_state(consolidate_state_dict(out)[0], consolidate_state_dict(tag_dir)[0])


def test_data_parallel_head(checkpoints, tmp_path):
    """Backbone + replicated FC7 in one engine: consolidate keeps the backbone, fc7 --merge takes the head."""
    root, results = checkpoints["data"]
    state, meta = consolidate_state_dict(root)
    _assert_same_state(state, results[0]["backbone"])
    merged = torch.load(merge_checkpoint(root / CHECKPOINTS_DIR / tag_for(STEPS), tmp_path / "fc7.pt"),
                        weights_only=True)
    assert torch.equal(merged["weight"], results[0]["weight"]) and merged["momentum"] is None
    assert merged["parallel"] == "data" and merged["num_classes"] == NUM_CLASSES
    assert inspect_checkpoint(root)["fc7"]["shards"] == []
    with pytest.raises(ValueError, match="data-parallel FC7 .* no shards to reshard"):
        reshard_checkpoint(root / CHECKPOINTS_DIR / tag_for(STEPS), 3, tmp_path / "w3")


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_bf16_reads_the_fp32_masters(checkpoints, stage):
    from megaface.checkpoint.zero_reader import read_fp32_state_dict

    root, results = checkpoints[f"bf16-{stage}"]
    state, info = read_fp32_state_dict(root / "tag" / DS_DIR)
    live = results[0]["module"]
    assert info["zero_stage"] == stage and sorted(state) == sorted(live)
    assert all(v.dtype == torch.float32 for v in state.values())
    # the fp32 masters round to the bf16 weights the engine computed with, and carry more precision
    assert all(torch.equal(state[k].bfloat16(), live[k]) for k in live)
    assert any(not torch.equal(state[k], live[k].float()) for k in live)
    if stage > 0:
        _assert_same_state(state, {k: v.float() for k, v in _deepspeed_fp32(root / "tag").items()})


def test_consolidate_bad_deepspeed_files(checkpoints, tmp_path):
    root, _ = checkpoints[3]
    tag = tmp_path / "step"
    shutil.copytree(root / CHECKPOINTS_DIR / tag_for(STEPS), tag)
    out = tmp_path / "out" / "backbone.pt"
    (tag / DS_DIR / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"rank\(s\) \[1\] \(zero_pp_rank_1_mp_rank_00_optim_states.pt\)"):
        consolidate(tag, out)
    shutil.copy(tag / DS_DIR / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                tag / DS_DIR / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    shutil.copy(tag / DS_DIR / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                tag / DS_DIR / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="extra optimizer partition file.*zero_pp_rank_2"):
        consolidate(tag, out)
    (tag / DS_DIR / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    model_file = tag / DS_DIR / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:-50])
    with pytest.raises(ValueError, match=rf"{model_file}: cannot read DeepSpeed model states .*truncated"):
        consolidate(tag, out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_consolidate_rejects_another_architecture(checkpoints, tmp_path):
    root, _ = checkpoints[1]
    tag = tmp_path / "step"
    shutil.copytree(root / CHECKPOINTS_DIR / tag_for(STEPS), tag)
    meta = json.loads((tag / META_FILE).read_text())
    (tag / META_FILE).write_text(json.dumps({**meta, "network": "iresnet18"}))
    with pytest.raises(ValueError, match=r"not a 'iresnet18' backbone .* missing: .* unexpected: "):
        consolidate(tag, tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()
