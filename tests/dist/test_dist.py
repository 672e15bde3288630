"""Launcher detection and the collectives of megaface.distributed, on one process and on 2-3 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from megaface.distributed import comm
from megaface.distributed.state import detect_launch_env
from tests.conftest import run_distributed


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, (0, 1, 0, 1, "single")),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, (3, 8, 1, 4, "torch")),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
          "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (1, 2, 1, 2, "openmpi")),
        ({"PMI_RANK": "2", "PMI_SIZE": "4"}, (2, 4, 2, 4, "pmi")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8"},
         (5, 16, 1, 8, "slurm")),
    ],
)
def test_detect_launch_env(environ: dict[str, str], expected: tuple) -> None:
    env = detect_launch_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == expected


def test_detect_launch_env_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="RANK='x'"):
        detect_launch_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        detect_launch_env({"RANK": "2", "WORLD_SIZE": "2"})


def _collectives(state) -> dict[str, torch.Tensor]:
    w, r = state.world_size, state.rank
    x = torch.arange(6, dtype=torch.float64).view(3, 2).add(10 * r).requires_grad_()
    gathered = comm.all_gather(x, state.group)
    weights = torch.arange(gathered.numel(), dtype=torch.float64).view_as(gathered)
    (gathered * weights).sum().backward()
    summed = comm.all_reduce_(x.detach().clone(), "sum", state.group)
    uneven = comm.gather_rows(torch.full((r + 1, 2), float(r)), state.group)
    return {
        "gathered": gathered.detach(),
        "grad": x.grad,
        "summed": summed,
        "max": comm.all_reduce_max(torch.tensor([float(r)]), state.group),
        "avg": comm.all_reduce_(torch.tensor([float(r)]), "avg", state.group),
        "uneven": uneven,
        "objects": comm.all_gather_object({"rank": r}, state.group),
        "w": w,
    }


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_collectives_match_their_contract(world_size: int) -> None:
    results = run_distributed(_collectives, world_size)
    w = world_size
    locals_ = [torch.arange(6, dtype=torch.float64).view(3, 2).add(10 * r) for r in range(w)]
    full = torch.cat(locals_)
    weights = torch.arange(full.numel(), dtype=torch.float64).view_as(full)
    for r, res in enumerate(results):
        assert torch.equal(res["gathered"], full)
        # every rank's loss is the same replicated sum, so the reduce-scatter gives W x its rows' weights
        assert torch.equal(res["grad"], w * weights[3 * r: 3 * r + 3])
        assert torch.equal(res["summed"], sum(locals_))
        assert res["max"].item() == w - 1
        assert res["avg"].item() == pytest.approx(sum(range(w)) / w)
        assert res["uneven"].shape == (w * (w + 1) // 2, 2)
        assert res["objects"] == [{"rank": k} for k in range(w)]


def _buffers(state) -> torch.Tensor:
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(state.rank + 1))
    comm.broadcast_buffers(bn, src=0, group=state.group)
    return bn.running_mean


def test_broadcast_buffers_gives_every_rank_rank0s() -> None:
    assert all(torch.equal(r, torch.ones(3)) for r in run_distributed(_buffers, 3))
