"""Sub-center ArcFace (K rows per class, class cosine = max over them) in the sharded Partial FC head: exact at
W = 1, 2, 3 against a dense single-process reference; Partial FC samples whole classes; shard files carry K."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaface.checkpoint.fc7_shards import load_shard_state_dict, merge_shards, shard_state_dict, split_merged
from megaface.distributed import DistState
from megaface.head import CombinedMargin, PartialFC, ShardSGD
from megaface.head.partial_fc import init_shard
from tests.conftest import run_distributed

B, D, C, K, S = 12, 16, 11, 3, 32.0
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=gen), torch.randint(0, C, (B,), generator=gen)


def dense_reference(emb, labels, classes=None, threshold=0.0, seed=0):
    """All C*K rows on one process: cos [B, C, K] -> max over K -> ArcFace on the target -> CE (autograd)."""
    emb = emb.detach().clone().requires_grad_(True)
    weight = init_shard(0, C * K, D, seed).requires_grad_(True)
    rows = weight.view(C, K, D) if classes is None else weight.view(C, K, D)[classes]
    y = labels if classes is None else torch.searchsorted(classes, labels)
    cos = torch.einsum("bd,ckd->bck", F.normalize(emb, dim=1), F.normalize(rows, dim=2)).amax(dim=2)
    target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, y[:, None], True)
    if threshold > 0:
        cos = torch.where(~target & (cos > threshold), torch.zeros_like(cos), cos)
    cos_y = cos.gather(1, y[:, None]).squeeze(1)
    logits = torch.where(target, CombinedMargin("arcface")(cos_y)[:, None], cos) * S
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return {"loss": loss.detach(), "emb": emb.grad, "w": weight.grad}


def _sharded(state: DistState) -> dict:
    emb_all, labels = _batch()
    b = B // state.world_size
    head = PartialFC(D, C, margin="arcface", scale=S, subcenters=K)
    emb = emb_all[state.rank * b:(state.rank + 1) * b].clone().requires_grad_(True)
    loss = head(emb, labels[state.rank * b:(state.rank + 1) * b])
    loss.backward()
    return {"loss": loss.detach(), "emb": emb.grad / state.world_size, "w": head.weight.grad.clone(),
            "rows": head.weight.shape[0], "num_local": head.num_local}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_subcenters_are_exact_at_world_sizes_1_2_3(world: int) -> None:
    results = run_distributed(_sharded, world) if world > 1 else [_sharded(DistState())]
    ref = dense_reference(*_batch())
    for r in results:
        assert r["rows"] == r["num_local"] * K  # all K rows of each class on its rank
        assert _rel(r["loss"], ref["loss"]) < RTOL
    assert _rel(torch.cat([r["emb"] for r in results]), ref["emb"]) < RTOL
    assert _rel(torch.cat([r["w"] for r in results]), ref["w"]) < RTOL


def test_partial_fc_samples_whole_classes_and_filtering_matches() -> None:
    emb_all, labels = _batch(1)
    head = PartialFC(D, C, margin="arcface", scale=S, subcenters=K, sample_rate=0.5, seed=2,
                     interclass_filtering_threshold=0.2)
    emb = emb_all.clone().requires_grad_(True)
    head(emb, labels).backward()
    rows = head.sampled_index.view(-1, K)
    classes = rows[:, 0] // K
    assert torch.equal(rows, classes[:, None] * K + torch.arange(K)) and classes.numel() < C
    assert set(labels.tolist()) <= set(classes.tolist())  # positives are always sampled
    ref = dense_reference(emb_all, labels, classes=classes, threshold=0.2, seed=2)
    assert _rel(emb.grad, ref["emb"]) < RTOL
    index, grad = head.row_grads.take()
    assert torch.equal(index, head.sampled_index)
    assert _rel(grad, ref["w"][index]) < RTOL
    assert ref["w"].abs().sum(dim=1)[index].gt(0).sum() < index.numel()  # losing sub-centers get no gradient


def test_bf16_compute_with_subcenters() -> None:
    emb_all, labels = _batch(2)
    head = PartialFC(D, C, margin="arcface", scale=S, subcenters=K, compute_dtype="bf16")
    emb = emb_all.clone().requires_grad_(True)
    loss = head(emb, labels)
    loss.backward()
    ref = dense_reference(emb_all, labels)
    assert _rel(loss.detach(), ref["loss"]) < 1e-2
    assert F.cosine_similarity(emb.grad.flatten(), ref["emb"].flatten(), dim=0) > 0.999


def test_shard_files_carry_k_through_merge_and_reshard() -> None:
    head = PartialFC(D, C, scale=S, subcenters=K, sample_rate=0.5)
    opt = ShardSGD(head, lr=0.1)
    emb, labels = _batch()
    head(emb, labels).backward()
    opt.step()
    saved = shard_state_dict(head, opt)
    assert saved["subcenters"] == K and saved["weight"].shape == (C * K, D)
    merged = merge_shards([saved])
    parts = split_merged(merged, 3)
    assert [p["weight"].shape[0] for p in parts] == [4 * K, 4 * K, 3 * K]
    assert torch.equal(torch.cat([p["momentum"] for p in parts]), saved["momentum"])
    assert torch.equal(merge_shards(parts)["weight"], saved["weight"])
    with pytest.raises(ValueError, match="subcenters=3 but this rank's head has subcenters=1"):
        load_shard_state_dict(PartialFC(D, C, scale=S), None, saved)
    bad = {**saved, "weight": saved["weight"][:C]}
    with pytest.raises(ValueError, match=r"expected \[num_local=11 x subcenters=3, embedding_size=16\]"):
        merge_shards([bad])
    with pytest.raises(ValueError, match=r"subcenters=0 is out of range: it must lie in \[1, 64\]"):
        PartialFC(D, C, subcenters=0)
