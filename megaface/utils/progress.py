"""Console progress for long jobs: a bar on a terminal, periodic plain lines when piped.

On a terminal: a tqdm bar with count, rate and ETA. Piped or redirected: a plain line every `every` seconds
and one when the job ends, e.g. ``pack: 12000/42000 images, 3100/s, ETA 0:00:10``, so a log file stays
readable. Progress goes to stderr by default: the summaries the commands print on stdout stay parseable.
In a distributed job only the main rank shows progress: the caller passes ``enabled=state.is_main`` (no
global rank lookup here); a disabled `Progress` still counts, so code paths are the same on every rank.
"""

from __future__ import annotations

import datetime
import shutil
import sys
import time
from types import TracebackType
from typing import Any, TextIO

from megaface.vocab import PROGRESS_MODES, ProgressMode

DEFAULT_EVERY = 10.0
"""Seconds between plain progress lines when the output is not a terminal."""


def format_seconds(seconds: float) -> str:
    """H:MM:SS, as the plain lines print durations and ETAs."""
    return str(datetime.timedelta(seconds=int(max(seconds, 0.0))))


def progress_line(what: str, done: int, total: int | None, unit: str, seconds: float, final: bool = False,
                  initial: int = 0) -> str:
    """One plain progress line: ``what: done/total unit, rate/s, ETA h:mm:ss`` (or the elapsed time at the end).

    `initial` items were done before `seconds` started counting (a resumed job): they count, but not in the rate.
    """
    rate = (done - initial) / seconds if seconds > 0 else 0.0
    count = f"{done}/{total}" if total is not None else f"{done}"
    line = f"{what}: {count} {unit}, {rate:.0f}/s"
    if final:
        return f"{line}, done in {format_seconds(seconds)}"
    if total is not None and rate > 0:
        line += f", ETA {format_seconds((total - done) / rate)}"
    return line


class Progress:
    """Progress of one job over `total` items (None: unknown); use as a context manager or call `close`.

    `initial` is what an earlier (resumed) run already did: it counts toward the total but not the rate.
    `mode`: auto = bar on a terminal, plain lines otherwise; on = bar even when not a terminal; off = nothing.
    """

    def __init__(self, what: str, total: int | None, unit: str = "items", enabled: bool = True,
                 mode: ProgressMode = "auto", every: float = DEFAULT_EVERY, initial: int = 0,
                 stream: TextIO | None = None) -> None:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(PROGRESS_MODES)}")
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.initial = self.done = initial
        self.enabled = enabled and mode != "off"
        self.started = self.last_line = time.perf_counter()
        self.lines = 0
        self.bar: Any = None
        if self.enabled and (mode == "on" or _isatty(self.stream)):
            self.bar = _make_bar(what, total, unit, initial, self.stream)

    def update(self, n: int = 1) -> None:
        """`n` more items done."""
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.every:
            self.last_line = now
            self._print(final=False)

    def write(self, message: str) -> None:
        """A message line that does not tear the bar (printed only when enabled)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar, or print the final plain line (count, rate, elapsed time)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self._print(final=True)
        self.enabled = False

    def _print(self, final: bool) -> None:
        seconds = time.perf_counter() - self.started
        line = progress_line(self.what, self.done, self.total, self.unit, seconds, final, self.initial)
        self.lines += 1
        print(line, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        elif self.bar is not None:  # a failed job: end the bar's line, print no "done" line
            self.bar.close()
            self.enabled = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def _make_bar(what: str, total: int | None, unit: str, initial: int, stream: TextIO) -> Any:
    from tqdm import tqdm

    # A pty that reports a 0x0 size (script(1), some IDE consoles, the ranks torchrun starts from one) makes
    # tqdm draw nothing: fix 100x20 there.
    size = shutil.get_terminal_size((0, 0))
    sized = size.columns > 0 and size.lines > 0
    return tqdm(total=total, initial=initial, desc=what, unit=f" {unit}", unit_scale=False, file=stream,
                dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20, smoothing=0.1)
