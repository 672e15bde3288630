"""Class-range math of the column-sharded FC7 (pure functions, no process group)."""

import pytest

from megaface.head.sharding import class_range, class_ranges


@pytest.mark.parametrize("num_classes,world_size", [(10, 1), (10, 2), (10, 3), (1000, 3), (85742, 8), (7, 7)])
def test_ranges_are_contiguous_and_follow_the_formula(num_classes, world_size):
    ranges = class_ranges(num_classes, world_size)
    start = 0
    for rank, (class_start, num_local) in enumerate(ranges):
        assert class_start == start
        assert num_local == num_classes // world_size + (rank < num_classes % world_size)
        start += num_local
    assert start == num_classes


def test_uneven_split_example():
    assert class_ranges(10, 3) == [(0, 4), (4, 3), (7, 3)]


def test_bad_arguments_raise_value_errors_naming_the_value():
    with pytest.raises(ValueError, match="num_classes=2 is smaller than world_size=3"):
        class_range(2, 3, 0)
    with pytest.raises(ValueError, match="rank=3"):
        class_range(10, 3, 3)
    with pytest.raises(ValueError, match="world_size=0"):
        class_range(10, 0, 0)
