"""`megaface train` and the pieces of a training run.

    cli.py            the command line (`megaface train ...`)
    build.py          process group, data, model, head, DeepSpeed engine and FC7 optimizer (before step 0)
    step.py           one micro-step and both optimizer steps (the data path)
    schedule.py       the learning-rate schedule of both optimizers
    loop.py           the iteration loop: lr, accumulation, logging, validation, checkpoints
    checkpointing.py  save and resume a whole run through `megaface.checkpoint`
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`megaface train ...`; returns the exit status (kept importable as `megaface.train.main`)."""
    from megaface.train.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
