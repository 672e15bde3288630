"""`python -m tests.support.fault_entry train ARGS`: `megaface train` with faults injected, for launcher-level tests.

Environment (all optional):
    MEGAFACE_TEST_POISON_CALLS  comma-separated train-step calls (1-based, counted per rank over the whole job)
                                whose images are replaced by inf: that batch diverges, the next ones are normal
    MEGAFACE_TEST_POISON_RANK   the rank that poisons (default 0)
    MEGAFACE_TEST_STEP_SLEEP    seconds each train step sleeps first (a slow step to signal into)
    MEGAFACE_TEST_EXIT_DIR      each rank writes its exit status to DIR/rank_<RANK> (launchers do not tell)
    MEGAFACE_TEST_LATE_REPORT   RANK:SECONDS: that rank reaches its failed-checkpoint line SECONDS late (a rank
                                descheduled on a loaded host, as in CI), after the other ranks have reported
"""

from __future__ import annotations

import os
import sys
import time


def _install() -> None:
    import torch

    from megaface.train import loop

    calls = {int(c) for c in os.environ.get("MEGAFACE_TEST_POISON_CALLS", "").split(",") if c}
    poison_rank = int(os.environ.get("MEGAFACE_TEST_POISON_RANK", "0"))
    sleep = float(os.environ.get("MEGAFACE_TEST_STEP_SLEEP", "0"))
    original, count = loop.train_step, [0]

    def injected(parts, images, labels):  # type: ignore[no-untyped-def]
        count[0] += 1
        if sleep:
            time.sleep(sleep)
        if count[0] in calls and parts.state.rank == poison_rank:
            shape = images.images.shape if hasattr(images, "images") else images.shape  # a RawBatch (uint8)
            images = torch.full(shape, float("inf"))  # float: train_step feeds it as it is
        return original(parts, images, labels)

    loop.train_step = injected
    late = os.environ.get("MEGAFACE_TEST_LATE_REPORT")
    if late:
        _report_late(*late.split(":"))


def _report_late(rank: str, seconds: str) -> None:
    from megaface.train import checkpointing

    original = checkpointing.not_written_message

    def late(*args, **kwargs):  # type: ignore[no-untyped-def]
        if os.environ.get("RANK", "0") == rank:
            time.sleep(float(seconds))
        return original(*args, **kwargs)

    checkpointing.not_written_message = late


if __name__ == "__main__":
    _install()
    from megaface.cli import main

    code = main(sys.argv[1:])
    exit_dir = os.environ.get("MEGAFACE_TEST_EXIT_DIR")
    if exit_dir:
        with open(os.path.join(exit_dir, f"rank_{os.environ.get('RANK', '0')}"), "w") as fh:
            fh.write(str(code))
    sys.exit(code)
