"""head.weight_dtype=bf16 across world sizes 1, 2, 3: the stochastic rounding is keyed by the global row, so the
sharded bf16 master weight follows the same trajectory at every world size (as the fp32 weight does, up to the
fp32 summation order of the distributed softmax, which can move a value across a rounding threshold)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401 - torch.optim.Optimizer() imports it; once here, not in every fork

from megaface.head import PartialFC, ShardSGD
from tests.conftest import run_distributed

B, D, C, STEPS = 12, 16, 31, 8


def _job(state, weight_dtype: str) -> dict:
    head = PartialFC(D, C, margin=(1.0, 0.3, 0.0), scale=16.0, seed=3, weight_dtype=weight_dtype)
    opt = ShardSGD(head, lr=0.5, momentum=0.9, weight_decay=5e-4, momentum_dtype="bf16")
    b = B // state.world_size
    mine = slice(state.rank * b, (state.rank + 1) * b)
    losses = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        labels = torch.randint(0, C, (B,), generator=gen)
        emb = torch.randn(B, D, generator=gen)
        loss = head(emb[mine], labels[mine])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"weight": head.weight.detach().float(), "losses": losses}


@pytest.mark.parametrize("world_size", [2, 3])
def test_bf16_weight_is_independent_of_the_world_size(world_size: int) -> None:
    (ref,) = run_distributed(_job, 1, "bf16")
    (ref32,) = run_distributed(_job, 1, "fp32")
    results = run_distributed(_job, world_size, "bf16")
    weight = torch.cat([r["weight"] for r in results])
    assert weight.shape == ref["weight"].shape
    for r in results:
        assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    differs = (weight != ref["weight"]).float().mean().item()
    assert differs < 0.01, differs  # the same random bits for the same global row and column
    # ... while the gap to the fp32 master is many times larger: rounding noise, but not the world size's
    assert (weight - ref["weight"]).norm() < 0.1 * (ref32["weight"] - ref["weight"]).norm()
