"""ShardAdamW: equal to torch.optim.AdamW when dense, row-local when sparse; its state survives the shard files."""
from __future__ import annotations

import pytest
import torch

from megaface.checkpoint.fc7_shards import load_shard_state_dict, merge_shards, reshard, shard_state_dict
from megaface.head import PartialFC, ShardAdamW, ShardSGD

NUM_CLASSES, DIM = 40, 8
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _head(sample_rate: float) -> PartialFC:
    torch.manual_seed(0)
    return PartialFC(DIM, NUM_CLASSES, margin=(1.0, 0.0, 0.0), scale=8.0, sample_rate=sample_rate)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(6, DIM, generator=g), torch.randint(0, NUM_CLASSES, (6,), generator=g)


def _train(head: PartialFC, opt: torch.optim.Optimizer, steps: range, lrs: list[float] | None = None) -> list:
    """Run `steps`; return per step the sampled index (None = all rows) and the weight before the step."""
    trace = []
    for i in steps:
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        emb, labels = _batch(i)
        head(emb, labels).backward()
        trace.append((head.sampled_index, head.weight.detach().clone()))
        opt.step()
        opt.zero_grad()
    return trace


def test_dense_equals_torch_adamw():
    head, ref_head = _head(1.0), _head(1.0)
    opt = ShardAdamW(head, **HYPER)
    ref = torch.optim.AdamW([ref_head.weight], **HYPER)
    lrs = [1e-2 * (1 - i / 10) for i in range(8)]  # a schedule changing lr between steps
    _train(head, opt, range(8), lrs)
    _train(ref_head, ref, range(8), lrs)
    torch.testing.assert_close(head.weight, ref_head.weight, rtol=0, atol=1e-6)
    state, ref_state = opt.row_state(), ref.state[ref_head.weight]
    torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"], rtol=0, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=0, atol=1e-6)
    assert state["row_step"].tolist() == [8] * NUM_CLASSES


def test_sparse_touches_only_sampled_rows_with_per_row_bias_correction():
    head = _head(0.25)
    opt = ShardAdamW(head, **HYPER)
    m = torch.zeros(NUM_CLASSES, DIM)
    v = torch.zeros(NUM_CLASSES, DIM)
    n = torch.zeros(NUM_CLASSES, dtype=torch.int64)
    lr, (b1, b2), eps, wd = HYPER["lr"], HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    for step in range(6):
        emb, labels = _batch(step)
        head(emb, labels).backward()
        index, grad = head.sampled_index, head.row_grads.grads()[0].clone()
        before = head.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        # reference: plain AdamW arithmetic on the sampled rows with each row's own step count
        n[index] += 1
        m[index] = b1 * m[index] + (1 - b1) * grad
        v[index] = b2 * v[index] + (1 - b2) * grad * grad
        k = n[index].double().unsqueeze(1)
        m_hat, v_hat = m[index] / (1 - b1 ** k).float(), v[index] / (1 - b2 ** k).float()
        expected = before[index] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(head.weight.detach()[index], expected, rtol=0, atol=1e-6)
        untouched = torch.ones(NUM_CLASSES, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(head.weight.detach()[untouched], before[untouched])  # bit for bit
    state = opt.row_state()
    assert torch.equal(state["row_step"], n) and len(set(n.tolist())) >= 3  # rows really differ in age
    torch.testing.assert_close(state["exp_avg"], m, rtol=0, atol=1e-6)


def test_dense_mode_with_sampling_equals_torch_adamw_on_scattered_gradients():
    head, ref_head = _head(0.25), _head(0.25)
    opt = ShardAdamW(head, sparse=False, **HYPER)
    ref = torch.optim.AdamW([ref_head.weight], **HYPER)
    for step in range(5):
        emb, labels = _batch(step)
        head(emb, labels).backward()
        opt.step()
        opt.zero_grad()
        ref_head(emb, labels).backward()
        index, grad = ref_head.row_grads.take()
        ref_head.weight.grad = torch.zeros_like(ref_head.weight).index_copy_(0, index, grad)
        ref.step()
        ref.zero_grad()
    torch.testing.assert_close(head.weight, ref_head.weight, rtol=0, atol=1e-6)


def test_state_round_trips_through_shard_files_and_reshard():
    head = _head(0.25)
    opt = ShardAdamW(head, **HYPER)
    _train(head, opt, range(4))
    saved = shard_state_dict(head, opt)
    assert saved["optimizer"] == "ShardAdamW" and saved["momentum"] is None
    assert saved["hyper"]["betas"] == (0.9, 0.99)
    # resharding 1 -> 3 -> 1 moves rows (weight, moments, step counts) exactly
    back = merge_shards(reshard([saved], 3))
    for key in ("weight", "exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(back[key], saved[key]), key
    assert back["row_step"].dtype == torch.int64
    # continuing from the file equals continuing in memory
    resumed_head = _head(0.25)
    resumed = ShardAdamW(resumed_head, **HYPER)
    load_shard_state_dict(resumed_head, resumed, saved)
    _train(head, opt, range(4, 7))
    _train(resumed_head, resumed, range(4, 7))
    assert torch.equal(resumed_head.weight, head.weight)


def test_resume_with_another_optimizer_is_refused():
    head = _head(1.0)
    opt = ShardAdamW(head, **HYPER)
    _train(head, opt, range(1))
    with pytest.raises(ValueError, match=r"ShardAdamW.*ShardSGD|optim.name"):
        load_shard_state_dict(_head(1.0), ShardSGD(_head(1.0), lr=0.1), shard_state_dict(head, opt))


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match="betas"):
        ShardAdamW(_head(1.0), lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        ShardAdamW(_head(1.0), lr=1e-3, eps=0.0)
