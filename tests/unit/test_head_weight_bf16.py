"""head.weight_dtype=bf16: stochastic rounding (unbiased, exact on bf16 values, keyed by global row and step),
ShardSGD on a bf16 master weight (sparse / dense, with and without momentum), exact resume, dtype conversion
on load, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401 - torch.optim.Optimizer() imports it

from megaface.checkpoint.fc7_shards import load_shard_state_dict, merge_shards, reshard, shard_state_dict
from megaface.config import load_config
from megaface.head import PartialFC, ShardAdamW, ShardSGD
from megaface.head.rounding import stochastic_round_bf16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above |x| (with x's sign): truncation and truncation + 1 ulp."""
    down = (x.view(torch.int32) & -65536).view(torch.float32)
    up = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return down, up


def test_stochastic_rounding_is_unbiased() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=gen) * torch.logspace(-20, 3, 64)  # signs and exponents of every kind
    draws = 4000
    rows = torch.arange(draws)
    out = stochastic_round_bf16(x.expand(draws, -1).contiguous(), seed=1, step=7, rows=rows).float()
    down, up = _neighbours(x)
    assert ((out == down) | (out == up)).all()  # always one of the two neighbours
    p_up = (x - down) / (up - down)  # the probability of rounding away from zero
    frac_up = (out == up).double().mean(0)
    # binomial: 5 standard deviations (plus a little for p near 0 or 1)
    assert ((frac_up - p_up).abs() <= 5 * (p_up * (1 - p_up) / draws).sqrt() + 2e-3).all()
    mean, ulp = out.double().mean(0), (up - down).double().abs()
    assert ((mean - x.double()).abs() <= 5 * ulp / draws ** 0.5).all()
    # round-to-nearest is biased on the same values (the test can tell the difference)
    nearest = x.bfloat16().float().double()
    assert ((nearest - x.double()).abs() > 5 * ulp / draws ** 0.5).any()


def test_stochastic_rounding_is_exact_on_bf16_values_and_keeps_non_finite() -> None:
    gen = torch.Generator().manual_seed(1)
    exact = (torch.randn(100, 32, generator=gen) * 10).bfloat16()
    got = stochastic_round_bf16(exact.float(), seed=3, step=5, rows=torch.arange(100))
    assert torch.equal(got.view(torch.int16), exact.view(torch.int16))
    special = torch.tensor([[float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3.3e38]])
    out = stochastic_round_bf16(special, seed=0, step=0, rows=torch.tensor([9]))
    assert out[0, 0] == float("inf") and out[0, 1] == -float("inf") and out[0, 2].isnan()
    assert out[0, 3] == 0 and out[0, 4] == 0 and torch.isfinite(out[0, 5])


def test_rounding_depends_on_global_row_and_step_not_on_the_split() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, 16, generator=gen)
    full = stochastic_round_bf16(x, seed=4, step=11, rows=torch.arange(100, 130))
    pieces = [stochastic_round_bf16(x[a:b], seed=4, step=11, rows=torch.arange(100 + a, 100 + b))
              for a, b in ((0, 7), (7, 19), (19, 30))]
    assert torch.equal(torch.cat(pieces).view(torch.int16), full.view(torch.int16))  # any shard split
    shuffled = torch.randperm(30, generator=gen)
    got = stochastic_round_bf16(x[shuffled], seed=4, step=11, rows=100 + shuffled)
    assert torch.equal(got.view(torch.int16), full[shuffled].view(torch.int16))  # any row order
    for other in (dict(seed=4, step=12), dict(seed=5, step=11)):
        assert not torch.equal(stochastic_round_bf16(x, rows=torch.arange(100, 130), **other), full)


def _train(head: PartialFC, opt: ShardSGD, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)
        labels = torch.randint(0, head.num_classes // 4, (16,), generator=gen)  # a quarter of the classes
        emb = torch.nn.functional.one_hot(labels % head.embedding_size, head.embedding_size).float()
        emb = emb + 0.3 * torch.randn(emb.shape, generator=gen)
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _build(compute: str = "bf16", momentum_dtype: str = "bf16", sparse: bool = True, rate: float = 0.2,
           momentum: float = 0.9, weight_dtype: str = "bf16") -> tuple[PartialFC, ShardSGD]:
    head = PartialFC(32, 400, scale=16.0, sample_rate=rate, seed=5, compute_dtype=compute, weight_dtype=weight_dtype)
    return head, ShardSGD(head, lr=0.2, momentum=momentum, sparse=sparse, momentum_dtype=momentum_dtype)


@pytest.mark.parametrize("compute,momentum_dtype,sparse,rate,momentum", [
    ("bf16", "bf16", True, 0.2, 0.9), ("bf16", "fp32", False, 0.2, 0.9), ("fp32", "bf16", True, 1.0, 0.9),
    ("bf16", "bf16", True, 0.2, 0.0)])
def test_bf16_weight_learns_and_resumes_exactly(compute, momentum_dtype, sparse, rate, momentum) -> None:
    head, opt = _build(compute, momentum_dtype, sparse, rate, momentum)
    before = head.weight.detach().clone()
    losses = _train(head, opt, 6)
    assert head.weight.dtype == torch.bfloat16 and torch.isfinite(head.weight.float()).all()
    if momentum:
        assert opt.momentum_buffer().dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[momentum_dtype]
    if sparse and rate < 1:  # unsampled rows keep their bits
        touched = (head.weight != before).any(dim=1)
        assert 0 < touched.sum() < 400
    state = shard_state_dict(head, opt)
    assert state["weight"].dtype == torch.bfloat16 and state["optimizer_steps"] == 6
    expected = _train(head, opt, 6, start=6)
    assert sum(expected[-3:]) < sum(losses[:3])  # it learns
    head2, opt2 = _build(compute, momentum_dtype, sparse, rate, momentum)
    load_shard_state_dict(head2, opt2, state)
    assert _train(head2, opt2, 6, start=6) == expected
    assert torch.equal(head2.weight.view(torch.int16), head.weight.view(torch.int16))


def test_bf16_weight_tracks_the_fp32_weight() -> None:
    """The accuracy effect in small: 60 sparse steps, bf16 weight vs fp32 weight (both bf16 momentum)."""
    runs = {}
    for weight_dtype in ("fp32", "bf16"):
        head, opt = _build(weight_dtype=weight_dtype)
        runs[weight_dtype] = (_train(head, opt, 60), head.weight.detach().float())
    (loss32, w32), (loss16, w16) = runs["fp32"], runs["bf16"]
    assert loss32[-1] < 0.8 * loss32[0]  # it learns (a margin of 0.5 at s=16 keeps the loss high)
    assert max(abs(a - b) / a for a, b in zip(loss32, loss16, strict=True)) < 0.03
    assert (w16 - w32).norm() / w32.norm() < 0.02


def test_shards_move_between_weight_dtypes() -> None:
    head32, opt32 = _build(weight_dtype="fp32")
    _train(head32, opt32, 2)
    head16, opt16 = _build(weight_dtype="bf16")
    load_shard_state_dict(head16, opt16, shard_state_dict(head32, opt32))  # fp32 file -> bf16 run: nearest
    assert torch.equal(head16.weight, head32.weight.detach().bfloat16())
    assert opt16.step_count == 2
    back, back_opt = _build(weight_dtype="fp32")
    load_shard_state_dict(back, back_opt, shard_state_dict(head16, opt16))  # bf16 -> fp32: exact
    assert torch.equal(back.weight, head16.weight.float())
    # merge / reshard move bf16 rows unchanged
    state = shard_state_dict(head16, opt16)
    parts = reshard([state], 3)
    assert all(p["weight"].dtype == torch.bfloat16 for p in parts)
    assert torch.equal(merge_shards(parts)["weight"].view(torch.int16), state["weight"].view(torch.int16))
    assert merge_shards(parts)["optimizer_steps"] == 2


def test_bf16_initial_rows_are_the_fp32_draw_rounded_to_nearest() -> None:
    bf16, fp32 = PartialFC(16, 9000, weight_dtype="bf16").weight, PartialFC(16, 9000).weight  # 3 init blocks
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, fp32.detach().bfloat16())


def test_weight_dtype_refusals() -> None:
    with pytest.raises(ValueError, match="weight_dtype='fp16' must be one of"):
        PartialFC(8, 10, weight_dtype="fp16")
    with pytest.raises(ValueError, match="weight_dtype='bf16' needs parallel='model'"):
        PartialFC(8, 10, parallel="data", weight_dtype="bf16")
    with pytest.raises(ValueError, match="ShardAdamW needs an fp32 FC7 weight"):
        ShardAdamW(PartialFC(8, 10, weight_dtype="bf16"), lr=1e-3)
    assert load_config(None, ["--train.max_steps=1", "--head.weight_dtype=bf16"]).head.weight_dtype == "bf16"
    with pytest.raises(ValueError, match="head.weight_dtype='bf16' needs head.parallel=model and optim.name=sgd"):
        load_config(None, ["--train.max_steps=1", "--head.weight_dtype=bf16", "--optim.name=adamw"])
    with pytest.raises(ValueError, match="head.weight_dtype"):
        load_config(None, ["--train.max_steps=1", "--head.weight_dtype=fp16"])
