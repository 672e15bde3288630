"""The train step's host syncs: losses read in batches (read_losses), FC7 without a norm unless needed, and
a count of the device reads (`.item/.tolist/.cpu/...`) of whole train steps, held at zero for fp32/bf16."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megaface.distributed import DistState, comm
from megaface.head import PartialFC, ShardSGD
from megaface.train.step import NonFiniteLoss, read_losses, step_fc7, train_step


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


# Every Tensor method through which Python reads a device value (each is a host sync on a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class _Engine:
    """What train_step uses of a DeepSpeed engine, around a plain module (no averaging: one rank)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.skipped_steps = module, 0
        self.opt = torch.optim.SGD(module.parameters(), lr=0.1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.flatten(1))

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad()


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _name: str = name, _original=original, **kwargs: object):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("head_kw,clip", [
    ({}, 0.0),
    ({"sample_rate": 0.3}, 0.0),
    ({"sample_rate": 0.3, "compute_dtype": "bf16"}, 5.0),
    ({"interclass_filtering_threshold": 0.2}, 5.0),
])
def test_fp32_and_bf16_train_steps_read_no_device_value(monkeypatch: pytest.MonkeyPatch, head_kw: dict,
                                                        clip: float) -> None:
    torch.manual_seed(0)
    head = PartialFC(8, 40, scale=16.0, **head_kw)
    parts = SimpleNamespace(engine=_Engine(torch.nn.Linear(12, 8)), input_format=torch.contiguous_format,
                            state=DistState(), input_dtype=torch.float32, head=head, precision="fp32",
                            fc7_optimizer=ShardSGD(head, lr=0.1), clip=clip)
    images, labels = torch.randn(6, 3, 2, 2), torch.tensor([0, 5, 5, 17, 39, 22])
    train_step(parts, images, labels)  # warm-up (lazy state, generator)
    before = head.weight.detach().clone()
    reads = _count_host_reads(monkeypatch)
    losses = [train_step(parts, images, labels) for _ in range(3)]
    assert reads == [], f"host reads in 3 steps: {reads}"
    monkeypatch.undo()
    assert not torch.equal(head.weight.detach(), before)  # the steps did train FC7
    assert all(torch.isfinite(loss) for loss in losses)


def test_the_host_read_counter_sees_a_read(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _count_host_reads(monkeypatch)
    torch.tensor([1.0, 2.0]).sum().item()
    float(torch.tensor(3.0))
    assert reads == ["item", "__float__"]
