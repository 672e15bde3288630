"""Pure class-range math for the column-sharded FC7 (no process group needed).

Rank r of W owns the contiguous classes [class_start, class_start + num_local) with
num_local = C // W + (r < C % W): the first C % W ranks hold one extra row, so uneven splits need no
padding of the class count.
"""

from __future__ import annotations


def _check(num_classes: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes={num_classes} is smaller than world_size={world_size}: every rank needs at least "
            "one class row; use fewer ranks for the classifier or a data-parallel head (parallel='data')"
        )


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local) of `rank`'s shard of `num_classes` classes split over `world_size` ranks."""
    _check(num_classes, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    base, extra = divmod(num_classes, world_size)
    num_local = base + (1 if rank < extra else 0)
    class_start = rank * base + min(rank, extra)
    return class_start, num_local


def class_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """[(class_start, num_local)] for every rank, in rank order (the checkpoint's `class_ranges`)."""
    return [class_range(num_classes, world_size, r) for r in range(world_size)]
