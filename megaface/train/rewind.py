"""`train.on_nonfinite: rewind`: recover from a divergence inside the same job.

A non-finite loss (or a non-finite state found before a save) is seen alike by every rank (the loss is a
global mean, or all-reduced; the state check is one all-reduce), so every rank rewinds together: it reloads
the newest checkpoint whose meta.json says it was verified finite (`load_checkpoint`: weights, buffers,
optimizer state, FC7, RNG), keeps its data loader where it is - so the batches between that checkpoint and
the divergence, the window that diverged, are skipped rather than replayed - and trains the next
`rewind_cooldown_steps` iterations at `rewind_lr_factor` times the scheduled lr. After `max_rewinds` rewinds,
or when no verified checkpoint exists, the run stops as with `on_nonfinite: stop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megaface.checkpoint.integrity import last_verified
from megaface.distributed import comm


@dataclass
class RewindPolicy:
    """How many rewinds are left and which iterations run at the lowered lr."""

    enabled: bool
    lr_factor: float
    cooldown_steps: int
    max_rewinds: int
    count: int = 0
    cooldown_until: int = -1  # iterations below this run at lr * lr_factor

    @classmethod
    def from_config(cls, train: Any) -> "RewindPolicy":
        return cls(train.on_nonfinite == "rewind", train.rewind_lr_factor, train.rewind_cooldown_steps,
                   train.max_rewinds)

    def lr_scale(self, iteration: int) -> float:
        return self.lr_factor if iteration < self.cooldown_until else 1.0

    def target(self, output_dir: Path, state: Any) -> Path | None:
        """Collective: the checkpoint to rewind to (rank 0 looks, every rank gets its answer), or None when
        rewinding is off, used up, or there is no verified checkpoint."""
        if not self.enabled or self.count >= self.max_rewinds:
            return None
        found = last_verified(output_dir) if state.is_main else None
        found = comm.broadcast_object(None if found is None else str(found), src=0, group=state.group)
        return None if found is None else Path(found)

    def rewound(self, reason: str, diverged_at: int, tag: Path, resumed_at: int,
                log: Callable[[str], None]) -> None:
        """Count a rewind to `resumed_at` and say so in one line."""
        self.count += 1
        self.cooldown_until = resumed_at + self.cooldown_steps
        log(f"train: {reason}: rewind {self.count} of {self.max_rewinds} to {tag} (iteration {resumed_at}); the "
            f"data of iterations {resumed_at}-{diverged_at} is skipped, lr x{self.lr_factor:g} for "
            f"{self.cooldown_steps} iterations")

    def stop_note(self) -> str:
        """Why the run stops now although rewinding is on ('' when it is off)."""
        if not self.enabled:
            return ""
        if self.count >= self.max_rewinds:
            return f"train.max_rewinds={self.max_rewinds} rewinds used up; "
        return "no verified checkpoint to rewind to; "
