"""One range per margin parameter: config load and direct construction accept and refuse the same values.

Each boundary is tried just inside and just outside, through `load_config` (the YAML/CLI path) and through
the constructor a library user calls (CombinedMargin, AdaFaceMargin, PartialFC).
"""

from __future__ import annotations

import math
import re

import pytest

from megaface.config import load_config
from megaface.config.ranges import RANGES
from megaface.head import AdaFaceMargin, CombinedMargin, PartialFC
from megaface.head.adaface import ADAFACE_RANGES
from megaface.head.margin import MARGIN_RANGES
from megaface.head.partial_fc import HEAD_RANGES

HALF_PI = math.pi / 2
BELOW_HALF_PI = math.nextafter(HALF_PI, 0.0)


def _construct(key: str, value: float) -> None:
    if key.startswith("head.margin["):
        margin = [1.0, 0.5, 0.0]
        margin[int(key[len("head.margin[")])] = value
        CombinedMargin(tuple(margin))
    elif key.startswith("head.adaface."):
        AdaFaceMargin(**{key.rsplit(".", 1)[1]: value})
    elif key == "head.scale":
        PartialFC(8, 10, scale=value)
    else:
        PartialFC(8, 10, subcenters=int(value))


def _override(key: str, value: float) -> list[str]:
    if key.startswith("head.margin["):
        margin = [1.0, 0.5, 0.0]
        margin[int(key[len("head.margin[")])] = value
        return [f"--head.margin=[{', '.join(repr(m) for m in margin)}]"]
    extra = ["--head.margin=adaface"] if key.startswith("head.adaface.") else []
    text = str(int(value)) if key == "head.subcenters" else repr(value)
    return [*extra, f"--{key}={text}"]


# (config key, a value just inside, a value just outside): both ends of every range that has two
CASES = [
    ("head.margin[0]", 10.0, 10.5), ("head.margin[0]", 1e-9, 0.0),
    ("head.margin[1]", 0.0, -1e-9), ("head.margin[1]", BELOW_HALF_PI, HALF_PI), ("head.margin[1]", 0.5, 2.0),
    ("head.margin[2]", 0.0, -0.2), ("head.margin[2]", 1.99, 2.0),
    ("head.adaface.m", BELOW_HALF_PI, HALF_PI), ("head.adaface.m", 0.0, -0.1),
    ("head.adaface.h", 0.0, -0.1), ("head.adaface.t_alpha", 1.0, 1.01), ("head.adaface.t_alpha", 0.0, -0.01),
    ("head.subcenters", 64, 65), ("head.subcenters", 1, 0),
    ("head.scale", 1e-3, 0.0),
]


def test_the_config_uses_the_heads_own_rules():
    for rules in (MARGIN_RANGES, ADAFACE_RANGES, HEAD_RANGES):
        for key, rule in rules.items():
            assert RANGES[key] is rule, key
    assert MARGIN_RANGES["head.margin[1]"] == (0.0, HALF_PI, False, True)
    assert {key for key, _, _ in CASES} == {*MARGIN_RANGES, *ADAFACE_RANGES, *HEAD_RANGES}


@pytest.mark.filterwarnings("ignore:head.scale=")  # s < 8 is legal, and warned about at load
@pytest.mark.parametrize(("key", "inside", "outside"), CASES)
def test_config_and_constructor_agree_at_the_boundary(key, inside, outside):
    _construct(key, inside)
    cfg = load_config(None, ["--train.max_steps=1", *_override(key, inside)])
    assert cfg.head is not None
    with pytest.raises(ValueError, match="is out of range: it must lie in"):
        _construct(key, outside)
    with pytest.raises(ValueError, match=rf"{re.escape(key)}={re.escape(str(outside))} is out of range"):
        load_config(None, ["--train.max_steps=1", *_override(key, outside)])


@pytest.mark.parametrize("entry", ["config", "constructor"])
def test_non_finite_margins_are_refused_from_both_entry_points(entry):
    with pytest.raises(ValueError, match="is not a finite number"):
        if entry == "config":
            load_config(None, ["--train.max_steps=1", "--head.margin=[1.0, .nan, 0.0]"])
        else:
            CombinedMargin((1.0, float("nan"), 0.0))


def test_unknown_preset_is_the_same_error_from_both_entry_points():
    with pytest.raises(ValueError, match=r"head.margin='arcfce' is not a preset \(did you mean 'arcface'\?\)"):
        load_config(None, ["--train.max_steps=1", "--head.margin=arcfce"])
    with pytest.raises(ValueError, match=r"margin='arcfce' is not a preset \(did you mean 'arcface'\?\)"):
        CombinedMargin("arcfce")
