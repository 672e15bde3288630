"""benchmarks/scale_model.py: the alpha-beta costs and the collectives it lists for each trainer's step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import scale_model as sm  # noqa: E402

LINK = sm.Link(alpha=1e-5, beta=1e10)


def test_costs_follow_the_ring_and_tree_formulas() -> None:
    big = sm.Collective("all_reduce", 1e9)
    assert sm.cost(big, 8, LINK) == pytest.approx(2 * 7 * 1e-5 + 2 * 7 / 8 * 1e9 / 1e10)  # ring wins
    small = sm.Collective("all_reduce", 4)
    assert sm.cost(small, 512, LINK) == pytest.approx(2 * 9 * 1e-5 + 2 * 4 / 1e10)  # tree wins
    gather = sm.Collective("all_gather", 8e6, count=3)
    assert sm.cost(gather, 4, LINK) == pytest.approx(3 * (3 * 1e-5 + 0.75 * 8e6 / 1e10))
    assert sm.cost(big, 1, LINK) == 0.0
    assert sm.wire_bytes(big, 4) == pytest.approx(1.5e9) and sm.wire_bytes(gather, 4) == pytest.approx(18e6)
    with pytest.raises(ValueError, match="unknown collective"):
        sm.cost(sm.Collective("all_to_all", 1), 2, LINK)


def test_megaface_step_lists_the_heads_collectives_and_the_zero_stage() -> None:
    step = sm.megaface_step(4, 32, 512, 1000, zero=0, act_bytes=2, grad_bytes=4, param_bytes=2)
    head = [(c.kind, c.nbytes) for c in step if c.part == "head"]
    b = 128  # global batch
    assert head == [("all_gather", b * 512 * 2), ("all_gather", b * 8), ("all_reduce", b * 4),
                    ("all_reduce", 2 * b * 4), ("reduce_scatter", b * 512 * 2)]
    assert [(c.kind, c.nbytes) for c in step if c.part == "backbone"] == [("all_reduce", 4000)]
    z3 = sm.megaface_step(4, 32, 512, 1000, zero=3, act_bytes=2, grad_bytes=4, param_bytes=2)
    assert [(c.kind, c.count) for c in z3 if c.part == "backbone"] == [("reduce_scatter", 1), ("all_gather", 1),
                                                                        ("all_gather", 2)]
    gloo = sm.megaface_step(4, 32, 512, 1000, zero=0, act_bytes=4, grad_bytes=4, param_bytes=4, gloo=True)
    assert gloo[4].kind == "all_reduce"  # gloo has no reduce-scatter


def test_arcface_torch_backward_is_one_reduce_per_rank() -> None:
    step = sm.arcface_torch_step(8, 16, 512, 1000, act_bytes=2)
    reduces = [c for c in step if c.kind == "reduce"]
    assert len(reduces) == 1 and reduces[0].count == 8 and reduces[0].nbytes == 16 * 512 * 2
    # W reduces of (W-1) hops each: the latency term grows with W^2, megaface's reduce-scatter with W
    mf = sum(sm.cost(c, 512, LINK) for c in sm.megaface_step(512, 16, 512, 0, 0, 2, 4, 2) if c.part == "head")
    at = sum(sm.cost(c, 512, LINK) for c in sm.arcface_torch_step(512, 16, 512, 0, 2) if c.part == "head")
    assert at > 10 * mf, (at, mf)


def test_calibration_recovers_alpha_and_beta() -> None:
    link = sm.Link(alpha=3e-5, beta=2e9)
    times = {(kind, n): sm.cost(sm.Collective(kind, n), 3, link)
             for kind in sm.CALIBRATION_KINDS for n in sm.CALIBRATION_BYTES}
    fitted = sm.fit_link(3, times)
    assert fitted.alpha == pytest.approx(link.alpha, rel=1e-6) and fitted.beta == pytest.approx(link.beta, rel=1e-6)


def test_the_fit_weighs_small_messages_like_large_ones() -> None:
    # 20% noise on one 4-byte all-reduce moves alpha by a bounded share, not by orders of magnitude
    link = sm.Link(alpha=5e-5, beta=1e9)
    times = {(kind, n): sm.cost(sm.Collective(kind, n), 2, link)
             for kind in sm.CALIBRATION_KINDS for n in sm.CALIBRATION_BYTES}
    times[("all_reduce", 4)] *= 1.2
    fitted = sm.fit_link(2, times)
    assert fitted.alpha == pytest.approx(link.alpha, rel=0.1) and fitted.beta == pytest.approx(link.beta, rel=0.1)
