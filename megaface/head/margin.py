"""Combined angular margin on the target logit: cos(m1 * theta + m2) - m3 (scaled by s afterwards).

Presets (`MARGIN_PRESETS`): arcface (1, 0.5, 0), cosface (1, 0, 0.35), combined (1, 0.3, 0.2) and a
SphereFace-like multiplicative margin (1.35, 0, 0). Only the target column of each sample gets the margin.

Gradient
    By default the true derivative flows back: d/dcos = m1 * sin(m1*theta + m2) / sin(theta), as the OneFlow
    seed computes it. `straight_through=True` evaluates the margin with no gradient through arccos/cos and
    passes the gradient of the target cosine through unchanged (d/dcos = 1), as InsightFace's PyTorch trainer
    does. The two give the same forward value.

Boundaries (decided here, tested in tests/unit/test_margin.py)
    * The cosine is clamped to [-1 + EPS, 1 - EPS] (EPS = 1e-6) before arccos, so theta lies in
      [theta_eps, pi - theta_eps], never 0 or pi exactly: no infinite derivative of arccos, no NaN. Cosines
      outside that interval (|cos| > 1 - EPS, including rounding overshoot past 1) take the value at the
      clamp and a zero gradient, the ordinary behaviour of a clamp.
    * cos(m1*theta + m2) stops decreasing once m1*theta + m2 passes pi, i.e. beyond
      theta_limit = (pi - m2) / m1 (pi - 0.5 for ArcFace). There the target logit follows a shifted cosine:
          f(theta) = cos(theta) - cos(theta_limit) - 1 - m3        for theta > theta_limit,
      which equals cos(pi) - m3 = -1 - m3 at theta_limit (continuous), keeps decreasing in theta (derivative
      -sin(theta) <= 0, d/dcos = 1: finite), and stays below cos(theta) - m3 (a penalty, never a bonus).
      Unlike the classic cos(theta) - m*sin(m) fallback it has no jump at the threshold.
      `fallback="none"` drops it and evaluates cos(m1*theta + m2) - m3 on the whole range, as InsightFace's
      PyTorch trainer does (the value rises again past theta_limit; only sensible with straight_through).
    * m1 == 1 and m2 == 0 (CosFace) never uses arccos: f = cos - m3 exactly, on the whole [-1, 1].
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch

from megaface.utils.ranges import Range, check_range
from megaface.vocab import MARGIN_PRESETS

EPS = 1e-6

FALLBACKS = ("shifted", "none")  # past theta_limit: the shifted cosine above, or plain cos(m1*theta + m2)


# The one rule for (m1, m2, m3), keyed by the config key; `megaface.config.ranges` checks the config with it
# and `resolve_margin` every margin built directly, so both entry points accept and refuse the same values.
#
# m2 in [0, pi/2): the target logit is cos(m1*theta + m2) - m3, so the best a perfectly aligned sample can
# reach (theta = 0) is cos(m2) - m3. With m2 >= pi/2 that is <= -m3 <= 0 while the cosines of unrelated
# classes sit around 0 (near-orthogonal embeddings), so the target could never lead: the margin has passed
# from "harder" to "impossible". Below pi/2 the fallback threshold theta_limit = (pi - m2) / m1 of an
# additive margin (m1 = 1) is above pi/2, which is where InsightFace's two treatments agree: its easy_margin
# applies the margin only where cos > 0 (theta < pi/2) and its threshold variant switches at
# cos(theta) = cos(pi - m2) < 0; with m2 < pi/2 both leave every acute angle on the plain formula, and so
# does megaface's shifted cosine (see "Boundaries" above). m1 in (0, 10]: a positive multiplier (SphereFace
# uses up to 4; 1 = none). m3 in [0, 2): a subtracted cosine; cosines span 2, so m3 >= 2 pushes every target
# below every possible non-target.
MARGIN_RANGES: dict[str, Range] = {
    "head.margin[0]": (0.0, 10.0, True, False),  # m1: multiplies theta (SphereFace); 1 = none
    "head.margin[1]": (0.0, math.pi / 2, False, True),  # m2: additive angle in radians (ArcFace 0.5)
    "head.margin[2]": (0.0, 2.0, False, True),  # m3: subtracted cosine (CosFace 0.35); cos spans 2
}
_MEANING = ("1 = no multiplicative margin", "0 = no additive angular margin; ArcFace uses 0.5",
            "0 = no subtracted cosine; CosFace uses 0.35")


def resolve_margin(margin: str | tuple[float, float, float] | list[float], key: str = "margin",
                   other_names: tuple[str, ...] = ()) -> tuple[float, float, float]:
    """A preset name or an (m1, m2, m3) triple -> (m1, m2, m3), checked against MARGIN_RANGES.

    `key` names the value in errors (the config passes 'head.margin'); `other_names` are further names
    the caller accepts (the config's adaptive margins), offered in the error of an unknown name.
    """
    if isinstance(margin, str):
        if margin not in MARGIN_PRESETS:
            names = [*MARGIN_PRESETS, *other_names]
            near = difflib.get_close_matches(margin, names, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ValueError(f"{key}={margin!r} is not a preset{hint}; use one of {sorted(names)} "
                             "or three numbers [m1, m2, m3]")
        return MARGIN_PRESETS[margin]
    values = tuple(float(m) for m in margin)
    if len(values) != 3:
        raise ValueError(f"{key}={margin!r} must be a preset name or three numbers [m1, m2, m3]")
    for i, (name, value, meaning) in enumerate(zip(("m1", "m2", "m3"), values, _MEANING, strict=True)):
        check_range(f"{key} {name}", value, MARGIN_RANGES[f"head.margin[{i}]"], meaning)
    m1, m2, m3 = values
    return m1, m2, m3


class Margin:
    """What the head and its softmax need of a margin (`CombinedMargin`, `megaface.head.adaface.AdaFaceMargin`).

    `for_batch(embeddings_local, gather, training)` is called once per head forward and returns the margin of
    that forward (a per-sample margin binds the batch there, `gather` all-gathering a [b] tensor to [B] or None
    on one rank; a fixed margin returns itself). The softmax then calls `margin(cos_t, rows)` on the target
    cosines [n] of global-batch samples `rows` [n] and `margin.derivative(cos_t, rows)` in backward.
    `describe()` is the plain-value record the shard files keep; `state()` / `load_state()` the tensors a
    resume needs (None for a margin without state).
    """

    def for_batch(self, embeddings_local: torch.Tensor, gather: Any, training: bool) -> Margin:
        return self

    def state(self) -> dict[str, torch.Tensor] | None:
        return None

    def load_state(self, state: Any, where: str) -> None:
        if state is not None:
            raise ValueError(f"{where}: the checkpoint carries margin state {sorted(state)} (trained with "
                             f"head.margin=adaface) but this head's margin is {self!r}; resume with its margin")

    def __call__(self, cos_t: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def derivative(self, cos_t: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """d margin / d cos_t, elementwise, computed by autograd on a tiny graph."""
        with torch.enable_grad():
            c = cos_t.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(c, rows).sum(), c)
        return grad

    def describe(self) -> Any:
        raise NotImplementedError


class CombinedMargin(Margin):
    """Elementwise target-cosine -> margined target cosine (unscaled); see the module docstring."""

    def __init__(self, margin: str | tuple[float, float, float] = (1.0, 0.5, 0.0),
                 straight_through: bool = False, fallback: str = "shifted") -> None:
        self.m1, self.m2, self.m3 = resolve_margin(margin)
        self.straight_through = bool(straight_through)
        if fallback not in FALLBACKS:
            raise ValueError(f"margin fallback={fallback!r} is not one of {list(FALLBACKS)}")
        self.fallback = fallback
        self.angular = not (self.m1 == 1.0 and self.m2 == 0.0)
        self.theta_limit = (math.pi - self.m2) / self.m1
        # Past this cosine the angle is beyond theta_limit; -1 when theta_limit >= pi (never reached).
        self.cos_limit = math.cos(self.theta_limit) if self.theta_limit < math.pi else -1.0

    def __repr__(self) -> str:
        return (f"CombinedMargin(m1={self.m1}, m2={self.m2}, m3={self.m3}, "
                f"straight_through={self.straight_through}, fallback={self.fallback!r})")

    def _value(self, cos_t: torch.Tensor) -> torch.Tensor:
        if not self.angular:
            return cos_t - self.m3
        c = cos_t.clamp(-1.0 + EPS, 1.0 - EPS)
        theta = torch.acos(c)
        inside = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.fallback == "none":
            return inside
        beyond = c - (self.cos_limit + 1.0 + self.m3)
        return torch.where(theta <= self.theta_limit, inside, beyond)

    def describe(self) -> tuple[float, float, float]:
        return (self.m1, self.m2, self.m3)

    def __call__(self, cos_t: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """cos_t [n] (target cosines) -> [n]: cos(m1*theta + m2) - m3 with the documented fallback."""
        if not self.straight_through:
            return self._value(cos_t)
        with torch.no_grad():
            shift = self._value(cos_t) - cos_t
        return cos_t + shift
