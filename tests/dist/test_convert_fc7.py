"""FC7 merge / reshard: exact row moves, the loss after resharding (2 -> 3 and 3 -> 2 ranks), bad shard sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401 - the first optimizer imports it (~10 s); once here, not in every forked rank

from megaface.checkpoint.fc7_shards import (MERGED_FORMAT, SHARD_FORMAT, load_checkpoint_shards, load_rank_shard,
                                            load_shard_state_dict, merge_shards, reshard, shard_state_dict)
from megaface.checkpoint.layout import FC7_DIR, META_FILE, fc7_shard_file_name
from megaface.convert.fc7 import merge_checkpoint, reshard_checkpoint
from megaface.head import PartialFC, ShardSGD
from megaface.head.sharding import class_range
from tests.conftest import run_distributed

C, D = 10, 4


def _shards(world_size: int, momentum: bool = True, seed: int = 0) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """Shard dicts (as shard_state_dict writes them) cut from a known full weight/momentum."""
    gen = torch.Generator().manual_seed(seed)
    weight, mom = torch.randn(C, D, generator=gen), torch.randn(C, D, generator=gen)
    out = []
    for rank in range(world_size):
        start, count = class_range(C, world_size, rank)
        out.append({"format": SHARD_FORMAT, "weight": weight[start:start + count].clone(),
                    "momentum": mom[start:start + count].clone() if momentum else None,
                    "class_start": start, "num_local": count, "num_classes": C, "embedding_size": D,
                    "rank": rank, "world_size": world_size,
                    "hyper": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "sparse": True},
                    "sampler_rng": torch.zeros(8, dtype=torch.uint8), "margin": (1.0, 0.5, 0.0), "scale": 64.0})
    return out, weight, mom


def test_merge_is_class_order_whatever_the_input_order():
    shards, weight, mom = _shards(3)
    merged = merge_shards(shards[::-1])
    assert merged["format"] == MERGED_FORMAT
    assert torch.equal(merged["weight"], weight) and torch.equal(merged["momentum"], mom)
    assert merged["class_ranges"] == [[0, 4], [4, 3], [7, 3]] and merged["source_world_size"] == 3
    assert merged["hyper"]["lr"] == 0.05 and merged["scale"] == 64.0 and "sampler_rng" not in merged


@pytest.mark.parametrize("src,dst", [(2, 3), (3, 2), (3, 1), (1, 4), (4, 4), (2, 10)])
def test_reshard_moves_rows_exactly(src, dst):
    shards, weight, mom = _shards(src)
    out = reshard(shards, dst)
    assert [(s["rank"], s["world_size"]) for s in out] == [(r, dst) for r in range(dst)]
    assert [(s["class_start"], s["num_local"]) for s in out] == [class_range(C, dst, r) for r in range(dst)]
    assert torch.equal(torch.cat([s["weight"] for s in out]), weight)
    assert torch.equal(torch.cat([s["momentum"] for s in out]), mom)
    for s in out:
        assert s["format"] == SHARD_FORMAT and s["sampler_rng"] is None and s["margin"] == (1.0, 0.5, 0.0)
        # a view would drag the whole merged matrix into every saved shard file
        assert s["weight"].untyped_storage().nbytes() == s["weight"].numel() * 4
    assert torch.equal(shards[0]["weight"], weight[:shards[0]["num_local"]])  # inputs untouched


def test_reshard_without_momentum():
    shards, weight, _ = _shards(2, momentum=False)
    out = reshard(shards, 3)
    assert all(s["momentum"] is None for s in out)
    assert torch.equal(torch.cat([s["weight"] for s in out]), weight)


def test_reshard_more_ranks_than_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes=10 is smaller than world_size=11"):
        reshard(_shards(2)[0], 11)


# ---- bad shard sets: the error names the shard and what was expected ------------------------------------

def _names(n: int) -> list[str]:
    return [f"/ckpt/fc7/{fc7_shard_file_name(r, n)}" for r in range(n)]


def test_missing_shard():
    shards, _, _ = _shards(3)
    with pytest.raises(ValueError, match=r"missing FC7 shard\(s\) for rank\(s\) \[1\] of world size 3 "
                                         r"\(expected shard_00001_of_00003\.pt\)"):
        merge_shards([shards[0], shards[2]], [_names(3)[0], _names(3)[2]])


def test_extra_shard():
    shards, _, _ = _shards(2)
    with pytest.raises(ValueError, match="shard_00001_of_00002.pt: extra shard: rank 1 also comes from"):
        merge_shards(shards + [dict(shards[1])], _names(2) + ["/ckpt/fc7/shard_00001_of_00002.pt"])
    alien = dict(shards[1], rank=2)
    with pytest.raises(ValueError, match="extra shard: rank 2 is outside world size 2"):
        merge_shards([shards[0], shards[1], alien])


def test_overlapping_and_gapped_ranges():
    shards, _, _ = _shards(2)
    overlap = dict(shards[1], class_start=4, num_local=6, weight=torch.zeros(6, D), momentum=torch.zeros(6, D))
    with pytest.raises(ValueError, match=r"shard_00001_of_00002.pt: class range \[4, 10\) overlaps .*shard_00000_of_00002.pt \(ends at class 5\)"):
        merge_shards([shards[0], overlap], _names(2))
    gap = dict(shards[1], class_start=6, num_local=4, weight=torch.zeros(4, D), momentum=torch.zeros(4, D))
    with pytest.raises(ValueError, match=r"class range \[6, 10\) leaves a gap .*: expected it to start at class 5"):
        merge_shards([shards[0], gap], _names(2))
    short = dict(shards[1], num_local=4, weight=torch.zeros(4, D), momentum=torch.zeros(4, D))
    with pytest.raises(ValueError, match=r"cover classes \[0, 9\) but num_classes=10"):
        merge_shards([shards[0], short], _names(2))


def test_num_classes_and_embedding_mismatch():
    shards, _, _ = _shards(2)
    with pytest.raises(ValueError, match="shard_00001_of_00002.pt: num_classes=11 but .*num_classes=10"):
        merge_shards([shards[0], dict(shards[1], num_classes=11)], _names(2))
    with pytest.raises(ValueError, match="embedding_size=8 but"):
        merge_shards([shards[0], dict(shards[1], embedding_size=8, weight=torch.zeros(5, 8),
                                      momentum=torch.zeros(5, 8))], _names(2))
    with pytest.raises(ValueError, match=r"FC7 weight has shape \(5, 4\), expected \[num_local=5, embedding_size=8"):
        merge_shards([shards[0], dict(shards[1], embedding_size=8)], _names(2))


def test_wrong_tensor_shapes_and_format():
    shards, _, _ = _shards(2)
    with pytest.raises(ValueError, match=r"shard #1: FC7 weight has shape \(5, 3\), expected \[num_local=5"):
        merge_shards([shards[0], dict(shards[1], weight=torch.zeros(5, 3))])
    with pytest.raises(ValueError, match="has no momentum while other shards do"):
        merge_shards([shards[0], dict(shards[1], momentum=None)])
    with pytest.raises(ValueError, match=r"not an FC7 shard \(format 'x'"):
        merge_shards([shards[0], dict(shards[1], format="x")])
    with pytest.raises(ValueError, match="not an FC7 shard"):
        merge_shards([shards[0], {"conv.weight": torch.zeros(2)}])


# ---- shard files inside a checkpoint -------------------------------------------------------------------

def _write_checkpoint(tag_dir: Path, world_size: int, num_classes: int = C) -> list[dict]:
    shards, _, _ = _shards(world_size)
    (tag_dir / "fc7").mkdir(parents=True)
    (tag_dir / "ds").mkdir()
    (tag_dir / "ds" / "placeholder.pt").write_bytes(b"ds files are copied verbatim")
    for s in shards:
        torch.save(s, tag_dir / FC7_DIR / fc7_shard_file_name(s["rank"], world_size))
    meta = {"format": "megaface.checkpoint.v1", "iteration": 3, "network": "iresnet18", "embedding_size": D,
            "num_classes": num_classes, "world_size": world_size, "class_ranges": [], "zero_stage": 0}
    (tag_dir / META_FILE).write_text(json.dumps(meta))
    return shards


def _no_output(directory: Path) -> None:
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.startswith("out")]
    assert leftovers == [], leftovers


def test_truncated_shard_file(tmp_path):
    tag = tmp_path / "step_00000003"
    _write_checkpoint(tag, 2)
    bad = tag / FC7_DIR / fc7_shard_file_name(1, 2)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{bad}: cannot read an FC7 shard .*truncated"):
        merge_checkpoint(tag, tmp_path / "out.pt")
    with pytest.raises(ValueError, match="truncated"):
        reshard_checkpoint(tag, 3, tmp_path / "out_w3")
    _no_output(tmp_path)


def test_missing_and_extra_shard_files(tmp_path):
    tag = tmp_path / "step_00000003"
    _write_checkpoint(tag, 3)
    (tag / FC7_DIR / fc7_shard_file_name(2, 3)).unlink()
    with pytest.raises(ValueError, match="missing FC7 shard.*shard_00002_of_00003.pt"):
        load_checkpoint_shards(tag)
    torch.save(_shards(2)[0][0], tag / FC7_DIR / fc7_shard_file_name(0, 2))
    with pytest.raises(ValueError, match="mixes shards of world sizes \\[2, 3\\]"):
        merge_checkpoint(tag, tmp_path / "out.pt")
    _no_output(tmp_path)


def test_meta_num_classes_mismatch(tmp_path):
    tag = tmp_path / "step_00000003"
    _write_checkpoint(tag, 2, num_classes=12)
    with pytest.raises(ValueError, match=r"meta.json: num_classes=12 but the FC7 shards have num_classes=10"):
        merge_checkpoint(tag, tmp_path / "out.pt")
    _no_output(tmp_path)


def test_reshard_checkpoint_files(tmp_path):
    tag = tmp_path / "step_00000003"
    shards = _write_checkpoint(tag, 2)
    out = reshard_checkpoint(tag, 3, tmp_path / "w3")
    assert (out / "ds" / "placeholder.pt").read_bytes() == b"ds files are copied verbatim"
    meta = json.loads((out / META_FILE).read_text())
    assert meta["world_size"] == 2 and meta["fc7_world_size"] == 3 and meta["fc7_resharded_from"] == 2
    own, stored = load_rank_shard(out, 3, 1)
    assert stored == 3 and (own["class_start"], own["num_local"]) == (4, 3)
    own, stored = load_rank_shard(tag, 3, 2)  # resharded on the fly
    assert stored == 2 and torch.equal(own["weight"], torch.cat([s["weight"] for s in shards])[7:])
    with pytest.raises(FileExistsError, match="already exists"):
        reshard_checkpoint(tag, 3, out)


# ---- the loss after resharding equals the loss the old world size computes ------------------------------

def _global_batch(step: int, b: int = 6, dim: int = 16, classes: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(b, dim, generator=gen), torch.randint(0, classes, (b,), generator=gen)


def _train_head(state, shards: list[dict] | None, steps: list[int]) -> dict:
    """Build a 16-d, 11-class head on this world size (optionally from resharded shards), then for each step:
    loss of the global batch (each rank feeds its slice) and one ShardSGD step."""
    head = PartialFC(16, 11, scale=16.0, margin=(1.0, 0.3, 0.0))
    opt = ShardSGD(head, lr=0.2, momentum=0.9, weight_decay=5e-4)
    if shards is not None:
        load_shard_state_dict(head, opt, shards[state.rank])
    losses, saved = [], None
    for step in steps:
        emb, labels = _global_batch(step)
        b = emb.shape[0] // state.world_size
        rows = slice(state.rank * b, (state.rank + 1) * b)
        loss = head(emb[rows].clone().requires_grad_(True), labels[rows])
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == steps[0]:
            saved = shard_state_dict(head, opt)  # the "checkpoint" after the first step
    return {"losses": losses, "saved": saved, "final": shard_state_dict(head, opt)}


@pytest.mark.parametrize("src,dst", [(2, 3), (3, 2)])
def test_loss_after_reshard_matches_old_world_size(src, dst):
    old = run_distributed(_train_head, src, None, [0, 1, 2])
    shards = reshard([r["saved"] for r in old], dst)
    new = run_distributed(_train_head, dst, shards, [1, 2])
    # step 1: same weights, same global batch -> same loss; step 2 also checks the resharded momentum
    assert new[0]["losses"] == pytest.approx(old[0]["losses"][1:], rel=1e-6, abs=1e-6)
    final_old = merge_shards([r["final"] for r in old])
    final_new = merge_shards([r["final"] for r in new])
    assert torch.allclose(final_old["weight"], final_new["weight"], atol=1e-6)
    assert torch.allclose(final_old["momentum"], final_new["momentum"], atol=1e-6)
