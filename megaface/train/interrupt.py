"""Preemption and Ctrl-C: finish the step, agree over the ranks, save, exit 143 / 130.

SIGTERM is how SLURM, Kubernetes and spot instances preempt a job; SIGINT is Ctrl-C (a terminal sends it to
every process of the job, and torchrun forwards the signal it receives to its ranks; the deepspeed launcher
sends SIGTERM to them). A handler only records the signal. Once per iteration each rank posts its vote
(the signal it got, and whether `train.save_every_minutes` has passed on its clock) in one small all-reduce
(max) on a CPU group, and reads the result one iteration later: the vote costs the step no wait, and every
rank takes the same decision at the same iteration. So after a signal the job runs at most two more
iterations (one in a single-process run), saves a checkpoint on every rank and exits with 128 + the signal number.

A second Ctrl-C (SIGINT at least `DOUBLE_PRESS_S` after the first signal, so that the copy a launcher
forwards right after the terminal's does not count) ends the process at once with status 130: one line, no
traceback, no checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

import torch

from megaface.distributed import DistState, comm

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as a shell reports it
DOUBLE_PRESS_S = 1.0


class StopSignals:
    """SIGTERM / SIGINT handlers for the life of a training run (`with StopSignals(state): ...`)."""

    def __init__(self, state: DistState) -> None:
        self.signum = 0
        self._state = state
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _say(self, text: str) -> None:
        if self._state.is_main:  # os.write: safe inside a handler, even while the main thread prints
            os.write(2, f"megaface train: {text}\n".encode())

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: its main process decides
            return
        now = time.monotonic()
        if not self.signum:
            self.signum, self._first_at = signum, now
            self._say(f"{signal.Signals(signum).name} received: finishing the iteration, then saving a checkpoint "
                      "(Ctrl-C again to stop at once without one)")
        elif signum == signal.SIGINT and now - self._first_at >= DOUBLE_PRESS_S:
            self._say("second Ctrl-C: stopping now, without a checkpoint")
            os._exit(EXIT_CODES[signal.SIGINT])


class StopVote:
    """The per-iteration vote (see the module docstring): `poll()` -> (agreed signal or 0, save by time)."""

    def __init__(self, state: DistState, signals: StopSignals, save_every_minutes: float) -> None:
        self._group = comm.cpu_group(state.group)  # collective when the main group is not gloo
        self._signals = signals
        self._interval_s = save_every_minutes * 60.0
        self._last_save = time.monotonic()
        self._pending: Callable[[], torch.Tensor] | None = None
        self._single = state.world_size == 1

    def saved(self) -> None:
        """A checkpoint was just written: the wall-time interval starts again."""
        self._last_save = time.monotonic()

    def poll(self) -> tuple[int, bool]:
        """The decision every rank voted on at the previous call; posts this call's vote."""
        agreed = (0, False)
        due = self._interval_s > 0 and time.monotonic() - self._last_save >= self._interval_s
        if self._single:  # nobody to agree with: decide now
            return self._signals.signum, due
        if self._pending is not None:
            signum, timed = self._pending().tolist()
            agreed = (int(signum), bool(timed))
        vote = torch.tensor([float(self._signals.signum), float(due)])
        self._pending = comm.all_reduce_max_async(vote, self._group)
        return agreed

    def close(self) -> None:
        """Wait for the last posted vote (every rank posted as many), so the group can shut down cleanly."""
        if self._pending is not None:
            self._pending()
            self._pending = None
