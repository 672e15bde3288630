"""AdaFace in the sharded Partial FC head: exact at W = 1, 2, 3 against a single-process reference written from
the paper's equations, equal to the AdaFace repository's head, its norm EMA in the shard files."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megaface.checkpoint.fc7_shards import load_shard_state_dict, merge_shards, shard_state_dict, split_merged
from megaface.head import AdaFaceMargin, PartialFC, ShardSGD
from megaface.head.partial_fc import init_shard
from tests.conftest import run_distributed

B, D, C, S = 12, 16, 10, 64.0
M, H, T_ALPHA = 0.4, 0.333, 0.01
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _embeddings(step: int, batch: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw embeddings with norms spread over ~[5, 40] (the quality signal) and labels."""
    gen = torch.Generator().manual_seed(100 + step)
    direction = F.normalize(torch.randn(batch, D, generator=gen), dim=1)
    norms = 5.0 + 35.0 * torch.rand(batch, 1, generator=gen)
    return direction * norms, torch.randint(0, C, (batch,), generator=gen)


def paper_reference(emb_raw, labels, weight, stats, straight_through=False, columns=None, threshold=0.0):
    """The paper's equations on the whole batch and all classes, one process: loss, d/d emb_raw, d/d weight.

    `stats` = [mean, std] of the EMA, updated in place (before use, as in the paper's Algorithm 1).
    `columns` restricts the softmax to those classes (Partial FC's sampled rows); `threshold` > 0 zeroes
    non-target cosines above it (inter-class filtering).
    """
    emb_raw = emb_raw.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    n = emb_raw.detach().norm(dim=1).clamp(0.001, 100)
    stats[0] = T_ALPHA * n.mean() + (1 - T_ALPHA) * stats[0]
    stats[1] = T_ALPHA * n.std() + (1 - T_ALPHA) * stats[1]
    q = (H * (n - stats[0]) / (stats[1] + 1e-3)).clamp(-1, 1)
    w_used = weight if columns is None else weight[columns]
    y = labels if columns is None else torch.searchsorted(columns, labels)
    cos = F.normalize(emb_raw, dim=1) @ F.normalize(w_used, dim=1).t()
    target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, y[:, None], True)
    if threshold > 0:
        cos = torch.where(~target & (cos > threshold), torch.zeros_like(cos), cos)
    cos_y = cos.gather(1, y[:, None]).squeeze(1)

    def margined(c):
        theta = torch.acos(c.clamp(-1 + 1e-3, 1 - 1e-3))
        return torch.cos((theta - M * q).clamp(1e-3, math.pi - 1e-3)) - (M + M * q)

    if straight_through:
        with torch.no_grad():
            shift = margined(cos_y) - cos_y
        new_y = cos_y + shift
    else:
        new_y = margined(cos_y)
    logits = torch.where(target, new_y[:, None], cos) * S
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return {"loss": loss.detach(), "emb": emb_raw.grad, "w": weight.grad}


def _head(world_rank_state=None, **kw) -> PartialFC:
    margin = AdaFaceMargin(M, H, T_ALPHA, straight_through=kw.pop("straight_through", False))
    return PartialFC(D, C, margin=margin, scale=S, **kw)


def _sharded_steps(state, steps: int = 2, **kw) -> list[dict]:
    head, b = _head(**kw), B // state.world_size
    out = []
    for step in range(steps):
        emb_raw, labels = _embeddings(step)
        emb = emb_raw[state.rank * b:(state.rank + 1) * b].clone().requires_grad_(True)
        head.zero_grad()
        loss = head(emb, labels[state.rank * b:(state.rank + 1) * b])
        loss.backward()
        out.append({"loss": loss.detach(), "emb": emb.grad / state.world_size, "w": head.weight.grad.clone(),
                    "stats": torch.cat([head.margin.batch_mean, head.margin.batch_std]).clone()})
    return out


def _check_against_reference(results: list[list[dict]], straight_through: bool = False) -> None:
    stats, weight = [torch.tensor(20.0), torch.tensor(100.0)], init_shard(0, C, D)
    for step in range(len(results[0])):
        emb_raw, labels = _embeddings(step)
        ref = paper_reference(emb_raw, labels, weight, stats, straight_through)
        per_rank = [r[step] for r in results]
        for r in per_rank:
            assert _rel(r["loss"], ref["loss"]) < RTOL
            assert torch.equal(r["stats"], per_rank[0]["stats"])  # the same EMA on every rank, bit for bit
            torch.testing.assert_close(r["stats"], torch.stack(stats).float(), rtol=1e-6, atol=0)
        assert _rel(torch.cat([r["emb"] for r in per_rank]), ref["emb"]) < RTOL
        assert _rel(torch.cat([r["w"] for r in per_rank]), ref["w"]) < RTOL


@pytest.mark.parametrize("world", [1, 2, 3])
def test_adaface_is_exact_at_world_sizes_1_2_3(world: int) -> None:
    results = run_distributed(_sharded_steps, world) if world > 1 else [_sharded_steps(_one_rank())]
    _check_against_reference(results)


def _one_rank():
    from megaface.distributed import DistState
    return DistState()


def test_adaface_straight_through_gradient() -> None:
    _check_against_reference([_sharded_steps(_one_rank(), straight_through=True)], straight_through=True)
    true = _sharded_steps(_one_rank(), steps=1)[0]["emb"]
    st = _sharded_steps(_one_rank(), steps=1, straight_through=True)[0]["emb"]
    assert _rel(st, true) > 1e-3  # the two gradients do differ


def test_adaface_with_partial_fc_filtering_and_bf16() -> None:
    emb_raw, labels = _embeddings(0)
    head = PartialFC(D, C, margin=AdaFaceMargin(M, H, T_ALPHA), scale=S, sample_rate=0.5, seed=3,
                     interclass_filtering_threshold=0.3)
    emb = emb_raw.clone().requires_grad_(True)
    head(emb, labels).backward()
    columns = head.sampled_index
    assert columns is not None and columns.numel() < C
    ref = paper_reference(emb_raw, labels, init_shard(0, C, D, seed=3), [torch.tensor(20.0), torch.tensor(100.0)],
                          columns=columns, threshold=0.3)
    assert _rel(emb.grad, ref["emb"]) < RTOL
    assert _rel(head.row_grads.take()[1], ref["w"][columns]) < RTOL
    bf16 = PartialFC(D, C, margin=AdaFaceMargin(M, H, T_ALPHA), scale=S, compute_dtype="bf16")
    emb16 = emb_raw.clone().requires_grad_(True)
    loss = bf16(emb16, labels)
    loss.backward()
    full = paper_reference(emb_raw, labels, init_shard(0, C, D), [torch.tensor(20.0), torch.tensor(100.0)])
    assert _rel(loss.detach(), full["loss"]) < 1e-2
    assert F.cosine_similarity(emb16.grad.flatten(), full["emb"].flatten(), dim=0) > 0.999


def test_eval_forward_leaves_the_ema_alone_and_shard_files_carry_it() -> None:
    head = _head()
    opt = ShardSGD(head, lr=0.1)
    emb, labels = _embeddings(0)
    head.eval()(emb, labels)
    assert head.margin.batch_mean.item() == 20.0 and head.margin.batch_std.item() == 100.0
    head.train()(emb, labels).backward()
    opt.step()
    saved = shard_state_dict(head, opt)
    assert saved["margin"] == {"name": "adaface", "m": M, "h": H, "t_alpha": T_ALPHA}
    assert torch.equal(saved["margin_state"]["batch_mean"], head.margin.batch_mean)
    merged = merge_shards([saved])
    assert torch.equal(merged["margin_state"]["batch_std"], head.margin.batch_std)
    resharded = split_merged(merged, 2)[1]
    fresh = _head()
    fresh.class_start, fresh.num_local = resharded["class_start"], resharded["num_local"]
    fresh.weight = torch.nn.Parameter(torch.zeros(resharded["num_local"], D))
    fresh.rank, fresh.world_size = 1, 2
    load_shard_state_dict(fresh, None, resharded)
    assert torch.equal(fresh.margin.batch_mean, head.margin.batch_mean)
    with pytest.raises(ValueError, match=r"margin state .*trained with head.margin=adaface"):
        load_shard_state_dict(PartialFC(D, C, scale=S), None, saved)
    with pytest.raises(ValueError, match="no AdaFace norm statistics"):
        load_shard_state_dict(_head(), None, shard_state_dict(PartialFC(D, C, scale=S)))


def _adaface_repo_head():
    root = os.environ.get("MEGAFACE_ADAFACE")
    if not root or not (Path(root) / "head.py").is_file():
        pytest.skip("set MEGAFACE_ADAFACE to a checkout of github:mk-minchul/AdaFace (its head.py) to compare")
    spec = importlib.util.spec_from_file_location("adaface_repo_head", Path(root) / "head.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_equals_the_adaface_repository_head() -> None:
    module = _adaface_repo_head()
    theirs = module.AdaFace(embedding_size=D, classnum=C, m=M, h=H, s=S, t_alpha=T_ALPHA)
    ours = _head()
    with torch.no_grad():
        theirs.kernel.copy_(ours.weight.detach().t())
    for step in range(3):  # three steps: the EMA carries over
        emb_raw, labels = _embeddings(step)
        norms = emb_raw.norm(dim=1, keepdim=True)
        logits = theirs(emb_raw / norms, norms, labels)
        expected = F.cross_entropy(logits, labels)
        got = ours(emb_raw, labels)
        assert abs(got.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item())), step
        assert torch.allclose(ours.margin.batch_mean, theirs.batch_mean, rtol=1e-6)
        assert torch.allclose(ours.margin.batch_std, theirs.batch_std, rtol=1e-6)
