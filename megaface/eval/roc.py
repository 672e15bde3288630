"""ROC curve figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from megaface.fileio import atomic_output_file


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
             title: str = "ROC", log_far: bool = False) -> Path:
    """Write one figure with a (FAR, TAR) curve per name; `log_far` for IJB-style FAR axes down to 1e-6."""
    import matplotlib  # an optional package: megaface.cli names the extra that installs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write ROC figure {path}: folder {path.parent} does not exist")
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (far, tar) in curves.items():
        far, tar = np.asarray(far), np.asarray(tar)
        order = np.argsort(far, kind="stable")
        if log_far:
            keep = far[order] > 0
            ax.semilogx(far[order][keep], tar[order][keep], label=name)
        else:
            ax.plot(far[order], tar[order], label=name)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_output_file(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
