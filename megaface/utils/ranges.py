"""A numeric range and its one check: `(low, high, low excluded, high excluded)`.

Config validation (`megaface.config.ranges`) and the constructors that take the same values directly
(`megaface.head`: margins, scale, sub-centers) check them with `check_range` against one shared rule, so a
value is accepted or refused alike wherever it enters.
"""

from __future__ import annotations

import math
from typing import Any

Range = tuple[float, float, bool, bool]


def range_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """'[0, 1.5708)': the interval in the usual notation."""
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_range(name: str, value: Any, rule: Range, fix: str) -> None:
    """Raise ValueError (one line: `name`, the value, the range, then `fix`) unless `value` is finite and in `rule`."""
    low, high, low_open, high_open = rule
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}={value} is not a finite number; it must lie in {range_text(*rule)}")
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not inside:
        raise ValueError(f"{name}={value!r} is out of range: it must lie in {range_text(*rule)}; {fix}")
