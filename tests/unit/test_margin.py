"""Combined margin cos(m1*theta + m2) - m3: values, true and straight-through gradients, boundaries."""

import math

import pytest
import torch

from megaface.head.margin import EPS, MARGIN_PRESETS, CombinedMargin, resolve_margin

MARGINS = [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2), (1.35, 0.0, 0.0), (1.2, 0.4, 0.1)]


def test_presets():
    assert MARGIN_PRESETS["arcface"] == (1.0, 0.5, 0.0)
    assert MARGIN_PRESETS["cosface"] == (1.0, 0.0, 0.35)
    assert MARGIN_PRESETS["combined"] == (1.0, 0.3, 0.2)
    assert MARGIN_PRESETS["sphereface"][0] > 1.0
    assert resolve_margin("arcface") == (1.0, 0.5, 0.0)


@pytest.mark.parametrize("margin", MARGINS)
def test_value_matches_formula_below_the_limit(margin):
    m1, m2, m3 = margin
    theta = torch.linspace(0.05, min(math.pi - 0.05, (math.pi - m2) / m1 - 1e-3), 50, dtype=torch.float64)
    out = CombinedMargin(margin)(torch.cos(theta))
    torch.testing.assert_close(out, torch.cos(m1 * theta + m2) - m3, rtol=0, atol=1e-12)


@pytest.mark.parametrize("margin", MARGINS)
def test_gradcheck_true_derivative_float64(margin):
    mg = CombinedMargin(margin)
    # Interior points on both sides of theta_limit, away from the kink itself and from the clamp.
    theta = torch.linspace(0.1, math.pi - 0.1, 41, dtype=torch.float64)
    theta = theta[(theta - mg.theta_limit).abs() > 1e-3]
    cos = torch.cos(theta).requires_grad_(True)
    assert torch.autograd.gradcheck(mg, (cos,), eps=1e-7, atol=1e-6)
    # ... and the closed form of the derivative below the limit.
    inside = theta < mg.theta_limit
    expected = margin[0] * torch.sin(margin[0] * theta + margin[1]) / torch.sin(theta)
    torch.testing.assert_close(mg.derivative(cos.detach())[inside], expected[inside])


@pytest.mark.parametrize("margin", MARGINS)
def test_straight_through_same_value_identity_gradient(margin):
    cos = torch.linspace(-0.999, 0.999, 101, dtype=torch.float64)
    true, st = CombinedMargin(margin), CombinedMargin(margin, straight_through=True)
    torch.testing.assert_close(st(cos), true(cos))
    x = cos.clone().requires_grad_(True)
    st(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(cos))


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundaries_finite_monotonic_continuous(margin, dtype):
    mg = CombinedMargin(margin)
    edges = torch.tensor([-1.0 - 1e-6, -1.0, -1.0 + 1e-9, 1.0 - 1e-9, 1.0, 1.0 + 1e-6, 0.0], dtype=dtype)
    for straight_through in (False, True):
        x = edges.clone().requires_grad_(True)
        out = CombinedMargin(margin, straight_through)(x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    # Non-increasing in theta over [0, pi] (beyond m1*theta + m2 = pi as well), continuous at theta_limit.
    theta = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)
    values = mg(torch.cos(theta))
    assert (values[1:] - values[:-1]).max() <= 1e-12
    assert (values[1:] - values[:-1]).abs().max() < 1e-3  # no jump anywhere (grid step ~1.6e-4)
    # A penalty, never a bonus: at most the plain target cosine (minus m3).
    assert (values - (torch.cos(theta) - margin[2])).max() <= EPS
    if mg.theta_limit < math.pi:
        at = mg(torch.tensor([math.cos(mg.theta_limit)], dtype=torch.float64))
        torch.testing.assert_close(at, torch.tensor([-1.0 - margin[2]], dtype=torch.float64))


def test_beyond_limit_follows_shifted_cosine():
    mg = CombinedMargin("arcface")
    theta = torch.tensor([math.pi - 0.3, math.pi - 0.1], dtype=torch.float64)
    expected = torch.cos(theta) - math.cos(math.pi - 0.5) - 1.0
    torch.testing.assert_close(mg(torch.cos(theta)), expected)
    torch.testing.assert_close(mg.derivative(torch.cos(theta)), torch.ones(2, dtype=torch.float64))


def test_cosface_needs_no_angle():
    cos = torch.tensor([1.0, -1.0, 0.3])
    assert torch.equal(CombinedMargin("cosface")(cos), cos - 0.35)


@pytest.mark.parametrize("bad,match", [((0.0, 0.5, 0.0), "m1=0.0"), ((1.0, -0.1, 0.0), "m2=-0.1"),
                                       ((1.0, 4.0, 0.0), "m2=4.0"), ((1.0, 0.5), "three numbers"),
                                       ("arc", "not a preset"), ((1.0, float("nan"), 0.0), "finite")])
def test_bad_margins(bad, match):
    with pytest.raises(ValueError, match=match):
        CombinedMargin(bad)
