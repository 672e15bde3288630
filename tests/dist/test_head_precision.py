"""The low-precision FC7 head (compute_dtype, momentum_dtype) and inter-class filtering.

* bf16 / fp16 GEMM operands against the fp32 head at 100k classes, s=64, with embeddings whose target cosines
  are spread like a trained model's: loss within 0.5 %, gradient cosine >= 0.999.
* Partial FC + sparse ShardSGD + exact resume in every precision, bf16 momentum included.
* Inter-class filtering: the sharded head (world sizes 1, 2, 3) against a single-process full-logit reference.
"""

import pytest
import torch
import torch._dynamo  # noqa: F401 - torch.optim.Optimizer() imports it; once here, not in every fork
import torch.nn.functional as F

from megaface.checkpoint.fc7_shards import load_shard_state_dict, shard_state_dict
from megaface.head import PartialFC, ShardSGD
from megaface.head.margin import CombinedMargin
from megaface.head.partial_fc import init_shard, resolve_compute_dtype
from tests.conftest import run_distributed

S = 64.0


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cosine(a, b):
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _trained_like(weight, labels, gen):
    """Embeddings [B, D] whose cosine to their class row is spread over [0.05, 0.85], like a trained model."""
    w_hat = F.normalize(weight[labels], dim=1)
    target_cos = torch.linspace(0.05, 0.85, labels.numel())[torch.randperm(labels.numel(), generator=gen)]
    noise = torch.randn(w_hat.shape, generator=gen)
    noise = F.normalize(noise - (noise * w_hat).sum(1, keepdim=True) * w_hat, dim=1)  # orthogonal to w_y
    return target_cos[:, None] * w_hat + (1 - target_cos[:, None] ** 2).sqrt() * noise


def _head_step(compute_dtype, emb, labels, num_classes):
    head = PartialFC(emb.shape[1], num_classes, scale=S, compute_dtype=compute_dtype)
    emb = emb.clone().requires_grad_(True)
    loss = head(emb, labels)
    loss.backward()
    return loss.detach(), emb.grad, head.weight.grad


# This CPU has no bf16/fp16 GEMM units: bf16 runs ~3-4x slower than fp32 and fp16 ~10-100x (a generic
# kernel), so the default run uses smaller class counts; the 100k-class cases are the slow ones.
@pytest.mark.parametrize("dtype,num_classes", [
    ("bf16", 10_000), ("fp16", 2_000),
    pytest.param("bf16", 100_000, marks=pytest.mark.slow), pytest.param("fp16", 100_000, marks=pytest.mark.slow)])
def test_low_precision_head_matches_fp32(dtype, num_classes):
    batch, dim = 128, 512
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    emb = _trained_like(init_shard(0, num_classes, dim), labels, gen)
    ref_loss, ref_emb, ref_w = _head_step("fp32", emb, labels, num_classes)
    loss, emb_grad, w_grad = _head_step(dtype, emb, labels, num_classes)
    assert w_grad.dtype == torch.float32 and emb_grad.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 5e-3, (loss, ref_loss)
    assert _cosine(emb_grad, ref_emb) >= 0.999
    assert _cosine(w_grad, ref_w) >= 0.999
    assert not torch.equal(emb_grad, ref_emb)  # the low-precision path really ran


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_sampled_rows_in_low_precision(dtype):
    """Partial FC under bf16 compute keeps the sampled rows and their gradient in bf16 (the memory saving),
    and that gradient still matches the fp32 head's; fp16 keeps fp32 rows (scaled gradients overflow fp16)."""
    num_classes, batch, dim = 4000, 64, 128
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    emb = _trained_like(init_shard(0, num_classes, dim), labels, gen)
    grads = {}
    for mode in ("fp32", dtype):
        head = PartialFC(dim, num_classes, scale=S, sample_rate=0.1, seed=5, compute_dtype=mode)
        emb_in = emb.clone().requires_grad_(True)
        head(emb_in, labels).backward()
        index, grad = head.row_grads.take()
        grads[mode] = (index, grad, emb_in.grad)
    (ref_index, ref_grad, ref_emb), (index, grad, emb_grad) = grads["fp32"], grads[dtype]
    assert torch.equal(index, ref_index)  # same draw in every precision
    assert grad.dtype == {"bf16": torch.bfloat16, "fp16": torch.float32}[dtype]
    assert emb_grad.dtype == torch.float32
    assert _cosine(grad, ref_grad) >= 0.999 and _cosine(emb_grad, ref_emb) >= 0.999
    assert not torch.equal(grad.float(), ref_grad)


def test_bf16_row_gradients_accumulate_in_fp32():
    """Two accumulated micro-batches: the merged sampled gradient is summed in fp32, and both shard
    optimizers step with bf16 row gradients."""
    head = PartialFC(32, 500, scale=S, sample_rate=0.2, seed=2, compute_dtype="bf16", accumulation_steps=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        labels = torch.randint(0, 500, (16,), generator=gen)
        head(_trained_like(init_shard(0, 500, 32), labels, gen), labels).backward()
    index, grad = head.row_grads.take()
    assert grad.dtype == torch.float32 and index.numel() > 100
    from megaface.head import ShardAdamW
    for make in (lambda h: ShardSGD(h, lr=0.1), lambda h: ShardAdamW(h, lr=1e-3)):
        head = PartialFC(32, 500, scale=S, sample_rate=0.2, seed=2, compute_dtype="bf16")
        opt, before = make(head), head.weight.detach().clone()
        labels = torch.randint(0, 500, (16,), generator=gen)
        head(_trained_like(init_shard(0, 500, 32), labels, gen), labels).backward()
        opt.step()
        assert head.weight.dtype == torch.float32 and torch.isfinite(head.weight).all()
        assert 0 < (head.weight != before).any(dim=1).sum() <= 100


def _train(head, opt, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)
        labels = torch.randint(0, head.num_classes, (16,), generator=gen)
        emb = _trained_like(init_shard(0, head.num_classes, head.embedding_size, seed=9), labels, gen)
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("compute_dtype,momentum_dtype,sparse", [
    ("bf16", "fp32", True), ("bf16", "bf16", True), ("fp16", "bf16", False), ("fp32", "bf16", True)])
def test_partial_fc_steps_and_exact_resume_in_every_precision(compute_dtype, momentum_dtype, sparse):
    def build():
        head = PartialFC(32, 2000, scale=S, sample_rate=0.1, seed=3, compute_dtype=compute_dtype)
        return head, ShardSGD(head, lr=0.1, sparse=sparse, momentum_dtype=momentum_dtype)

    head, opt = build()
    before = head.weight.detach().clone()
    _train(head, opt, 2)
    assert head.weight.dtype == torch.float32  # master weights stay fp32
    assert opt.momentum_buffer().dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[momentum_dtype]
    if sparse:  # unsampled rows keep weight and momentum bit-for-bit
        touched = (head.weight != before).any(dim=1)
        assert 0 < touched.sum() < 2000 and not opt.momentum_buffer()[~touched].any()
    state = shard_state_dict(head, opt)
    assert state["momentum"].dtype == opt.momentum_buffer().dtype
    expected = _train(head, opt, 2, start=2)
    head2, opt2 = build()
    load_shard_state_dict(head2, opt2, state)
    assert _train(head2, opt2, 2, start=2) == expected
    assert torch.equal(head2.weight, head.weight) and torch.equal(opt2.momentum_buffer(), opt.momentum_buffer())


def test_bf16_momentum_tracks_fp32_momentum(monkeypatch):
    """The accuracy effect of bf16 momentum: 40 sparse and dense steps, chunked (16 rows a chunk)."""
    from megaface.head import optim
    monkeypatch.setattr(optim, "ROW_CHUNK", 16)
    for sparse in (True, False):
        runs = {}
        for momentum_dtype in ("fp32", "bf16"):
            head = PartialFC(32, 200, scale=S, sample_rate=0.2, seed=4)
            opt = ShardSGD(head, lr=0.1, sparse=sparse, momentum_dtype=momentum_dtype)
            runs[momentum_dtype] = (_train(head, opt, 40), head.weight.detach().clone())
        (loss32, w32), (loss16, w16) = runs["fp32"], runs["bf16"]
        assert loss32[-1] < loss32[0]  # it does learn
        assert max(abs(a - b) / a for a, b in zip(loss32, loss16)) < 1e-2
        assert (w16 - w32).norm() / w32.norm() < 1e-2


# ---- inter-class filtering ---------------------------------------------------------------------------

B, D, C, THRESHOLD = 12, 16, 10, 0.2
MARGIN = (1.0, 0.5, 0.0)


def _filter_batch():
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, C, (B,), generator=gen)
    weight = init_shard(0, C, D)
    # half the samples lie near another class as well: "conflicting" labels with large non-target cosines
    other = F.normalize(weight[(labels + 1) % C], dim=1)
    emb = _trained_like(weight, labels, gen) + 0.8 * other * (torch.arange(B) % 2)[:, None]
    return emb, labels


def _filter_reference(threshold):
    """Full logits in one process, with arcface_torch's rule: non-target cosines > threshold -> 0."""
    emb, labels = _filter_batch()
    emb.requires_grad_(True)
    w = init_shard(0, C, D).requires_grad_(True)
    cos = F.normalize(emb) @ F.normalize(w).t()
    target = F.one_hot(labels, C).bool()
    keep = ((cos <= threshold) | target | (threshold <= 0)).detach()
    cos = cos * keep
    cos_t = cos.gather(1, labels[:, None]).squeeze(1)
    logits = cos.scatter(1, labels[:, None], CombinedMargin(MARGIN)(cos_t)[:, None]) * S
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return {"loss": loss.detach(), "emb": emb.grad, "w": w.grad, "filtered": int((~keep).sum())}


def _filter_job(state, threshold, compute_dtype):
    emb, labels = _filter_batch()
    b = B // state.world_size
    mine = slice(state.rank * b, (state.rank + 1) * b)
    head = PartialFC(D, C, margin=MARGIN, scale=S, interclass_filtering_threshold=threshold,
                     compute_dtype=compute_dtype)
    emb_local = emb[mine].clone().requires_grad_(True)
    loss = head(emb_local, labels[mine])
    loss.backward()
    # emb_local.grad carries W x dL/d(emb_local) for DeepSpeed's average (see partial_fc's gradient algebra)
    return {"loss": loss.detach(), "emb": emb_local.grad / state.world_size, "w": head.weight.grad}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_interclass_filtering_is_exact_when_sharded(world_size, monkeypatch):
    from megaface.head import softmax
    monkeypatch.setattr(softmax, "_block_columns", lambda batch, k, device: 2)  # filter across block edges
    ref, unfiltered = _filter_reference(THRESHOLD), _filter_reference(0.0)
    assert ref["filtered"] > 5 and abs(ref["loss"] - unfiltered["loss"]) > 1e-3  # the filter matters here
    results = run_distributed(_filter_job, world_size, THRESHOLD, "fp32")
    for r in results:
        assert _rel(r["loss"], ref["loss"]) < 1e-5
    assert _rel(torch.cat([r["emb"] for r in results]), ref["emb"]) < 1e-5
    assert _rel(torch.cat([r["w"] for r in results]), ref["w"]) < 1e-5


def test_interclass_filtering_in_bf16_and_off_by_default():
    ref = _filter_reference(THRESHOLD)
    (got,) = run_distributed(_filter_job, 1, THRESHOLD, "bf16")
    assert abs(got["loss"] - ref["loss"]) / ref["loss"] < 5e-3
    assert _cosine(got["emb"], ref["emb"]) > 0.999 and _cosine(got["w"], ref["w"]) > 0.999
    (off,) = run_distributed(_filter_job, 1, 0.0, "fp32")
    assert _rel(off["loss"], _filter_reference(0.0)["loss"]) < 1e-5


def test_precision_and_threshold_errors():
    assert resolve_compute_dtype("auto", "bf16") == "bf16" and resolve_compute_dtype("fp16", "fp32") == "fp16"
    with pytest.raises(ValueError, match="compute_dtype=auto but the DeepSpeed precision is 'int8'"):
        resolve_compute_dtype("auto", "int8")
    with pytest.raises(ValueError, match="resolve 'auto' with resolve_compute_dtype"):
        PartialFC(D, C, compute_dtype="auto")
    with pytest.raises(ValueError, match=r"interclass_filtering_threshold=1.5 must lie in \[0, 1\)"):
        PartialFC(D, C, interclass_filtering_threshold=1.5)
    with pytest.raises(ValueError, match="momentum_dtype='fp16' must be one of"):
        ShardSGD(PartialFC(D, C), lr=0.1, momentum_dtype="fp16")
