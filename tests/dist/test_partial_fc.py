"""PartialFC + ShardSGD against a single-process reference that materialises the full logits.

Distributed cases run on gloo (world sizes 2 and 3; 3 splits C=10 as 4/3/3). Every check of one world size
is batched into one forked job. "What the backbone sees" is simulated: a tiny linear backbone per rank, its
gradient averaged over ranks as DeepSpeed does, compared with the reference backbone's gradient.
"""

import math

import pytest
import torch
import torch._dynamo  # noqa: F401 - torch.optim.Optimizer() imports it (~6 s); once here, not in every fork
import torch.nn.functional as F
from torch import nn

from megaface.distributed import comm
from megaface.checkpoint.fc7_shards import load_shard_state_dict, shard_state_dict
from megaface.head import PartialFC, ShardSGD
from megaface.head.margin import CombinedMargin
from megaface.head.partial_fc import init_shard
from tests.conftest import run_distributed
from tests.support.partial_fc_reference import D, MARGINS, RTOL, S, _backbone, _batch, _local_step, _reference, _rel


def _exact_job(state, num_classes):
    return [_local_step(state, PartialFC(D, num_classes, margin=m, scale=S)) for m in MARGINS]


def _check_exact(results, num_classes):
    world = len(results)
    for i, margin in enumerate(MARGINS):
        ref = _reference(num_classes, margin)
        per_rank = [r[i] for r in results]
        for r in per_rank:
            assert _rel(r["loss"], ref["loss"]) < RTOL, margin
            assert _rel(r["bb"], ref["bb"]) < RTOL, margin  # the backbone after averaging: exact
        # embeddings_local carry W x dL/d(emb_local) (pre-compensated for DeepSpeed's 1/W average)
        emb_grad = torch.cat([r["emb"] for r in per_rank]) / world
        assert _rel(emb_grad, ref["emb"]) < RTOL, margin
        assert [r["class_start"] for r in per_rank] == sorted(r["class_start"] for r in per_rank)
        assert _rel(torch.cat([r["w"] for r in per_rank]), ref["w"]) < RTOL, margin


@pytest.mark.parametrize("margin,straight_through", [((1.0, 0.5, 0.0), True), ((1.0, 0.3, 0.2), True),
                                                     ("sphereface", False), ("arcface", False)])
def test_straight_through_and_presets_world_size_1(margin, straight_through):
    from megaface.distributed import DistState
    head = PartialFC(D, 10, margin=CombinedMargin(margin, straight_through), scale=S)
    got, ref = _local_step(DistState(), head), _reference(10, margin, straight_through=straight_through)
    for key in ("loss", "bb", "emb", "w"):
        assert _rel(got[key], ref[key]) < RTOL, key


def _world2_job(state):
    out = {"exact": _exact_job(state, 10)}
    # parallel="data": replicated weight, local mean; DeepSpeed averages backbone AND head gradients.
    head = PartialFC(D, 10, margin=MARGINS[2], scale=S, parallel="data")
    step = _local_step(state, head)
    out["data"] = {"bb": step["bb"], "w": comm.all_reduce_(step["w"].clone(), "avg"),
                   "loss": comm.all_reduce_(step["loss"].clone(), "avg")}
    errors = []
    try:
        PartialFC(D, 1)
    except ValueError as exc:
        errors.append(str(exc))
    try:  # a bad label on rank 1 only: both ranks must raise (checked on the global labels)
        labels = torch.tensor([0, 99]) if state.rank == 1 else torch.tensor([0, 1])
        PartialFC(D, 10)(torch.randn(2, D), labels)
    except RuntimeError as exc:  # the head's no-sync guard (torch._assert_async); the loader names the record
        errors.append(str(exc))
    out["errors"] = errors
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Logit blocks of 3 columns, so the multi-block path runs (forked ranks inherit the patch)."""
    from megaface.head import softmax
    monkeypatch.setattr(softmax, "_block_columns", lambda batch, k, device: 3)


def test_exact_world_size_1():
    _check_exact(run_distributed(_exact_job, 1, 10), 10)


def test_exact_world_size_1_small_blocks(small_blocks):
    _check_exact(run_distributed(_exact_job, 1, 10), 10)


def test_world_size_2_exact_data_parallel_and_errors():
    results = run_distributed(_world2_job, 2)
    _check_exact([r["exact"] for r in results], 10)
    ref = _reference(10, MARGINS[2])
    for r in results:
        assert _rel(r["data"]["loss"], ref["loss"]) < RTOL
        assert _rel(r["data"]["bb"], ref["bb"]) < RTOL
        assert _rel(r["data"]["w"], ref["w"]) < RTOL
        assert "num_classes=1 is smaller than world_size=2" in r["errors"][0]
        assert "a label is outside [0, num_classes=10)" in r["errors"][1]


def _world3_job(state):
    out = {"exact": _exact_job(state, 10)}
    head = PartialFC(D, 1000, margin=MARGINS[0], scale=S, sample_rate=0.1)
    opt = ShardSGD(head, lr=0.1)
    step = _local_step(state, head)
    index = head.sampled_index
    before = head.weight.detach().clone()
    opt.step()
    out["pfc"] = {"loss": step["loss"], "bb": step["bb"], "index": index + head.class_start,
                  "class_start": head.class_start, "num_local": head.num_local,
                  "changed": (head.weight != before).any(dim=1).nonzero().squeeze(1)}
    return out


def test_world_size_3_exact_and_partial_fc(small_blocks):
    results = run_distributed(_world3_job, 3)
    _check_exact([r["exact"] for r in results], 10)
    _, labels = _batch(1000)
    columns = torch.cat([r["pfc"]["index"] for r in results])
    assert torch.equal(columns, columns.sort().values)
    ref = _reference(1000, MARGINS[0], columns=columns)
    for r in results:
        p = r["pfc"]
        lo, hi = p["class_start"], p["class_start"] + p["num_local"]
        positives = labels[(labels >= lo) & (labels < hi)].unique()
        assert torch.isin(positives, p["index"]).all()
        assert p["index"].numel() == max(math.ceil(0.1 * p["num_local"]), positives.numel())
        assert _rel(p["loss"], ref["loss"]) < RTOL and _rel(p["bb"], ref["bb"]) < RTOL
        assert torch.equal(p["changed"] + lo, p["index"])  # only sampled rows moved


# ---- single process: Partial FC updates, ShardSGD, shard files, precision, bad input -----------------

def _pfc_step(head, opt, seed):
    x, y = _batch(head.num_classes, seed)
    head(_backbone()(x).detach(), y).backward()
    index, grad = head.sampled_index, opt.grads()[0].clone()
    opt.step()
    opt.zero_grad()
    return index, grad


def _torch_sgd_rows(rows, grad, buf, lr=0.1, momentum=0.9, wd=5e-4):
    p = nn.Parameter(rows.clone())
    ref = torch.optim.SGD([p], lr=lr, momentum=momentum, weight_decay=wd)
    if buf is not None:
        ref.state[p]["momentum_buffer"] = buf.clone()
    p.grad = grad.clone()
    ref.step()
    return p.detach(), ref.state[p]["momentum_buffer"]


def test_sparse_update_touches_only_sampled_rows_and_matches_torch_sgd():
    head = PartialFC(D, 300, sample_rate=0.1, seed=3)
    opt = ShardSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    _pfc_step(head, opt, seed=0)
    for seed in (1, 2):
        w0, m0 = head.weight.detach().clone(), opt.momentum_buffer().clone()
        x, y = _batch(300, seed)
        labels = y.clone()
        head(_backbone()(x).detach(), y).backward()
        assert torch.equal(y, labels)  # labels never modified
        index = head.sampled_index
        assert head.weight.grad is None and opt.grads()[0].shape == (index.numel(), D)
        assert torch.isin(y.unique(), index).all() and index.numel() == max(30, y.unique().numel())
        w_ref, m_ref = _torch_sgd_rows(w0[index], opt.grads()[0], m0[index])
        opt.step()
        untouched = torch.ones(300, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(head.weight[untouched], w0[untouched])  # bit-for-bit
        assert torch.equal(opt.momentum_buffer()[untouched], m0[untouched])
        torch.testing.assert_close(head.weight[index].detach(), w_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.momentum_buffer()[index], m_ref, rtol=1e-6, atol=1e-7)
        opt.zero_grad()


def test_dense_option_updates_every_row_like_torch_sgd():
    head = PartialFC(D, 300, sample_rate=0.1, seed=3)
    opt = ShardSGD(head, lr=0.1, sparse=False)
    w0 = head.weight.detach().clone()
    x, y = _batch(300)
    head(_backbone()(x).detach(), y).backward()
    dense = torch.zeros(300, D).index_copy_(0, head.sampled_index, opt.grads()[0])
    w_ref, m_ref = _torch_sgd_rows(w0, dense, None)
    opt.step()
    torch.testing.assert_close(head.weight.detach(), w_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.momentum_buffer(), m_ref, rtol=1e-6, atol=1e-7)
    assert (head.weight != w0).all(dim=1).all()  # weight decay reached unsampled rows too


def test_sample_rate_one_equals_full_head_and_dense_torch_sgd():
    full, pfc = PartialFC(D, 50), PartialFC(D, 50, sample_rate=1.0)
    opt = ShardSGD(pfc, lr=0.1)
    x, y = _batch(50)
    emb = _backbone()(x).detach()
    loss_full, loss_pfc = full(emb, y), pfc(emb, y)
    loss_full.backward()
    loss_pfc.backward()
    assert torch.equal(loss_full, loss_pfc) and torch.equal(full.weight.grad, pfc.weight.grad)
    assert pfc.sampled_index is None
    w_ref, _ = _torch_sgd_rows(pfc.weight.detach(), pfc.weight.grad, None)
    opt.step()
    torch.testing.assert_close(pfc.weight.detach(), w_ref, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_merges_sampled_rows():
    head = PartialFC(D, 300, sample_rate=0.1, accumulation_steps=2)
    opt = ShardSGD(head, lr=0.1, momentum=0.0, weight_decay=0.0)
    w0 = head.weight.detach().clone()
    dense = torch.zeros(300, D)
    for seed in (0, 1):
        x, y = _batch(300, seed)
        head(_backbone()(x).detach(), y).backward()
        dense.index_add_(0, head.sampled_index, head.row_grads.grads()[-1])
    opt.step()
    torch.testing.assert_close(head.weight.detach(), w0 - 0.1 * dense, rtol=1e-6, atol=1e-7)


def test_shard_state_dict_round_trip_resumes_exactly():
    head, opt = PartialFC(D, 300, sample_rate=0.1, seed=5), None
    opt = ShardSGD(head, lr=0.05)
    _pfc_step(head, opt, seed=0)
    state = shard_state_dict(head, opt)
    assert state["format"] == "megaface.fc7_shard.v1" and state["momentum"].shape == (300, D)
    assert (state["class_start"], state["num_local"], state["num_classes"]) == (0, 300, 300)
    assert state["hyper"] == {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "sparse": True}
    expected = _pfc_step(head, opt, seed=1)

    head2 = PartialFC(D, 300, sample_rate=0.1, seed=5)
    opt2 = ShardSGD(head2, lr=0.1)
    load_shard_state_dict(head2, opt2, state)
    assert opt2.param_groups[0]["lr"] == 0.05
    index, grad = _pfc_step(head2, opt2, seed=1)
    assert torch.equal(index, expected[0]) and torch.equal(grad, expected[1])
    assert torch.equal(head2.weight, head.weight)
    assert torch.equal(opt2.momentum_buffer(), opt.momentum_buffer())
    opt3 = ShardSGD(PartialFC(D, 300, sample_rate=0.1, seed=5), lr=0.1)
    opt3.load_state_dict(opt.state_dict())  # the plain torch Optimizer state round-trips as well
    assert torch.equal(opt3.momentum_buffer(), opt.momentum_buffer())
    with pytest.raises(ValueError, match="num_classes=300 but this rank's head has num_classes=301"):
        load_shard_state_dict(PartialFC(D, 301), None, state)
    with pytest.raises(ValueError, match=r"not an FC7 shard \(format 'other', expected 'megaface.fc7_shard.v1'\)"):
        load_shard_state_dict(head2, opt2, {"format": "other"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_embeddings_are_computed_in_fp32(dtype):
    head = PartialFC(D, 10)
    x, y = _batch(10)
    emb = _backbone()(x).detach()
    ref = head(emb.to(dtype).float(), y)
    low = emb.to(dtype).requires_grad_(True)
    loss = head(low, y)
    assert loss.dtype == torch.float32 and torch.equal(loss, ref)
    loss.backward()
    assert low.grad.dtype == dtype and torch.isfinite(low.grad).all()


def test_int32_labels_and_eval_mode_uses_all_rows():
    head = PartialFC(D, 300, sample_rate=0.1).eval()
    x, y = _batch(300)
    with torch.no_grad():
        loss = head(_backbone()(x), y.int())
    assert head.sampled_index is None and torch.isfinite(loss)


@pytest.mark.parametrize("kwargs,match", [
    ({"sample_rate": 0.0}, r"sample_rate=0.0 must lie in \(0, 1\]"),
    ({"sample_rate": 1.5}, r"sample_rate=1.5 must lie in \(0, 1\]"),
    ({"parallel": "pipeline"}, "parallel='pipeline'"),
    ({"num_classes": 0}, "num_classes=0"),
    ({"scale": 0.0}, "scale=0.0"),
])
def test_bad_construction(kwargs, match):
    args = {"embedding_size": D, "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        PartialFC(**args)


def test_partial_fc_with_a_data_parallel_head_is_a_callers_bug():
    # users meet this as a config error (tests/unit/test_config.py); here it is an internal assertion
    with pytest.raises(AssertionError, match="validate the config before building the head"):
        PartialFC(D, 10, sample_rate=0.5, parallel="data")


@pytest.mark.parametrize("emb,labels,match", [
    (torch.randn(4, D + 1), torch.tensor([0, 1, 2, 3]), f"width {D + 1} != embedding_size={D}"),
    (torch.ones(4, D, dtype=torch.int64), torch.tensor([0, 1, 2, 3]), "dtype=torch.int64 is not a floating"),
    (torch.randn(4, D), torch.tensor([0.0, 1.0, 2.0, 3.0]), "labels dtype=torch.float32"),
    (torch.randn(4, D), torch.tensor([0, 1, 2]), "1-D tensor of 4 class ids"),
])
def test_bad_inputs(emb, labels, match):
    with pytest.raises(ValueError, match=match):
        PartialFC(D, 10)(emb, labels)


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2, 10]), torch.tensor([0, -1, 2, 3])])
def test_out_of_range_labels_stop_the_head_without_a_host_read(labels):
    with pytest.raises(RuntimeError, match=r"a label is outside \[0, num_classes=10\)"):
        PartialFC(D, 10)(torch.randn(4, D), labels)


def test_sampled_rows_need_the_shard_optimizer() -> None:
    """With Partial FC the rows are detached copies: a generic optimizer never sees their gradients, and the
    head says so at the next training forward instead of leaving FC7 untrained."""
    from megaface.head import PartialFC, ShardSGD

    torch.manual_seed(0)
    head = PartialFC(16, 200, sample_rate=0.1, scale=8.0)
    embeddings, labels = torch.randn(8, 16), torch.randint(0, 200, (8,))
    generic = torch.optim.SGD(head.parameters(), lr=0.1)
    head(embeddings, labels).backward()
    generic.step()
    with pytest.raises(RuntimeError, match="no optimizer step consumed their row gradients"):
        head(embeddings, labels)
    # the shard optimizer consumes them: any number of steps works, and accumulation is declared up front
    head = PartialFC(16, 200, sample_rate=0.1, scale=8.0, accumulation_steps=2)
    shard = ShardSGD(head, lr=0.1)
    for _ in range(3):
        for _ in range(2):
            head(embeddings, labels).backward()
        shard.step()
        shard.zero_grad()
