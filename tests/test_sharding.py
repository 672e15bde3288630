"""Class-range math of the column-sharded FC7 (pure functions, no process group)."""

import pytest

from megaface.head.sharding import class_range, class_ranges, owner_of


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


@pytest.mark.parametrize("num_classes,world_size", [(10, 3), (1000, 3), (12, 4), (5, 5)])
def test_owner_of_matches_ranges(num_classes, world_size):
    for rank, (start, count) in enumerate(class_ranges(num_classes, world_size)):
        for class_id in range(start, start + count):
            assert owner_of(class_id, num_classes, world_size) == rank


def test_bad_arguments_raise_value_errors_naming_the_value():
    with pytest.raises(ValueError, match="num_classes=2 is smaller than world_size=3"):
        class_range(2, 3, 0)
    with pytest.raises(ValueError, match="rank=3"):
        class_range(10, 3, 3)
    with pytest.raises(ValueError, match="world_size=0"):
        class_range(10, 0, 0)
    with pytest.raises(ValueError, match="class_id=10"):
        owner_of(10, 10, 3)
