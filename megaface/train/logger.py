"""Training log: the seed's `train: iter N, loss L, throughput: T` lines, tensorboard scalars, a progress bar.

Only rank 0 prints and writes tensorboard; other ranks keep the counters (cheap) so the code path is the
same everywhere. Throughput is global samples per second (train_batch_size / iteration time); the windowed
average covers the last `window` iterations. The progress bar (with an ETA) appears on rank 0 when its stdout
is a terminal (or progress=on), also under torchrun, whose ranks inherit its terminal; log
lines then go through it so they do not tear the bar. Piped output stays plain lines.
"""

from __future__ import annotations

import collections
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from megaface.distributed import DistState


class TrainLogger:
    """Per-iteration bookkeeping and output for the train loop."""

    def __init__(self, state: DistState, output_dir: str | Path, global_batch: int, total_steps: int,
                 start_iteration: int, log_every: int = 10, window: int = 50, tensorboard: bool = True,
                 progress: str = "auto") -> None:
        self.main = state.is_main
        self.global_batch = global_batch
        self.log_every = log_every
        self.times: collections.deque[float] = collections.deque(maxlen=window)
        self.writer = self._writer(Path(output_dir) / "tensorboard") if (tensorboard and self.main) else None
        show_bar = progress == "on" or (progress == "auto" and sys.stdout.isatty())
        self.bar = None
        if self.main and show_bar:
            from tqdm import tqdm

            # On stdout, the stream the terminal check looked at: `2> err.log` gets no bar. The default
            # format ends with [elapsed<ETA, rate]. A pty that reports a 0x0 size (script(1), some IDE
            # consoles, and the ranks torchrun starts from one) makes tqdm draw nothing: fix 100x20 there.
            size = shutil.get_terminal_size((0, 0))
            sized = size.columns > 0 and size.lines > 0
            self.bar = tqdm(total=total_steps, initial=start_iteration, unit="it", file=sys.stdout,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20)
        self.started = time.perf_counter()

    @staticmethod
    def _writer(directory: Path) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: scalars are optional, the text log is not
            return None
        directory.mkdir(parents=True, exist_ok=True)
        return SummaryWriter(log_dir=str(directory))

    def info(self, message: str) -> None:
        """A line on rank 0 (through the bar when there is one)."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def iteration(self, iteration: int, loss: float, seconds: float, lr: float, loss_scale: float | None,
                  skipped: int) -> None:
        """Record one iteration (0-based, as the seed prints it); print every `log_every` iterations."""
        self.times.append(seconds)
        if not self.main:
            return
        throughput = self.global_batch / max(seconds, 1e-9)
        average = self.global_batch * len(self.times) / max(sum(self.times), 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tput=f"{average:.1f}", refresh=False)
        if self.writer is not None:
            step = iteration + 1
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/throughput", average, step)
            if loss_scale is not None:
                self.writer.add_scalar("train/loss_scale", loss_scale, step)
        if (iteration + 1) % self.log_every == 0:
            line = (f"train: iter {iteration}, loss {loss}, throughput: {throughput:.3f}, "
                    f"avg throughput: {average:.3f}, lr {lr:.6g}")
            if loss_scale is not None:
                line += f", loss scale {loss_scale:g}, skipped {skipped}"
            self.info(line)

    def scalars(self, values: dict[str, float], iteration: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, iteration + 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
