"""`megaface train` and the pieces of a training run.

cli.py            the command line (`megaface train ...`)
build.py          process group, data, model, head, DeepSpeed engine and FC7 optimizer (before step 0)
step.py           one micro-step and both optimizer steps (the data path)
optim.py          both optimizers from the experiment's optim section
schedule.py       the learning-rate schedule of both optimizers
loop.py           the iteration loop: lr, accumulation, logging, validation, checkpoints
checkpointing.py  save and resume a whole run through `megaface.checkpoint`
checkpoint_writes.py  one rank's checkpoint writes, a full disk caught on every rank alike
interrupt.py      SIGTERM / SIGINT: finish the iteration, agree over the ranks, save, exit 143 / 130
rewind.py         train.on_nonfinite = rewind: reload the newest verified checkpoint after a divergence
run_lock.py       one run per output directory (a lock file)
logger.py         the log lines, tensorboard scalars and progress bar
summary.py        `megaface summary`: what a finished run produced
preview.py        `megaface pack preview`: a grid of training samples after data.augment
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`megaface train ...`; returns the exit status (kept importable as `megaface.train.main`)."""
    from megaface.train.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
