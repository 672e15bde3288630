"""The train step's host syncs: losses read in batches (read_losses), FC7 without a norm unless needed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megaface.distributed import DistState, comm
from megaface.head import PartialFC, ShardSGD
from megaface.train.step import NonFiniteLoss, read_losses, step_fc7


def _parts(precision: str) -> SimpleNamespace:
    return SimpleNamespace(fc7_optimizer=object(), state=DistState(), precision=precision)


def test_read_losses_reads_all_at_once_and_names_the_first_non_finite_iteration() -> None:
    pending = [torch.tensor(2.0), torch.tensor(1.5, dtype=torch.bfloat16)]
    assert read_losses(pending, _parts("fp32"), 10) == [2.0, 1.5]
    assert read_losses([], _parts("fp32"), 0) == []
    bad = [torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(float("inf"))]
    for precision in ("fp32", "bf16"):
        with pytest.raises(NonFiniteLoss) as caught:
            read_losses(bad, _parts(precision), 7)
        assert caught.value.iteration == 8 and math.isnan(caught.value.value)
    values = read_losses(bad, _parts("fp16"), 7)  # fp16 skips such steps: no stop
    assert math.isnan(values[1]) and values[2] == float("inf")


def test_fc7_without_clipping_or_fp16_needs_no_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    head = PartialFC(4, 6, seed=0)
    opt = ShardSGD(head, lr=1.0, momentum=0.0, weight_decay=0.0)
    head.weight.grad = torch.full_like(head.weight, 0.5)
    start = head.weight.detach().clone()

    def no_collective(*args: object, **kwargs: object) -> None:
        raise AssertionError("step_fc7 all-reduced a norm that fp32/bf16 without clipping does not need")

    monkeypatch.setattr(comm, "all_reduce_", no_collective)
    assert step_fc7(opt, DistState(), None, 0.0, True)
    torch.testing.assert_close(head.weight.detach(), start - 0.5)
    head.weight.grad = torch.full_like(head.weight, 0.5)
    with pytest.raises(AssertionError, match="all-reduced"):  # clipping does need the global norm
        step_fc7(opt, DistState(), None, 1.0, True)
