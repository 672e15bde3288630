"""What a finished training run produced, in a few lines: the best Accuracy-Flip, the model file, what next.

    python -m megaface.train.summary runs/quickstart [--seconds 212]

Reads the `best_<pack>.pt.json` sidecars that the trainer writes next to each best backbone
(`validation.save_best`): their meta holds the pack name, the iteration, the Accuracy-Flip and the run's
resolved config, from which the verification pack's path is recovered for the suggested `megaface eval`.
launch/quickstart.sh prints this after training.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megaface.checkpoint.layout import BEST_SIDECAR_GLOB, sidecar_path
from megaface.data.synthetic import synthetic_dir


def best_models(output_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """(backbone file, its meta) for every best_<pack>.pt in `output_dir`, best Accuracy-Flip first."""
    found = []
    for sidecar in sorted(Path(output_dir).glob(BEST_SIDECAR_GLOB)):
        model = sidecar.with_suffix("")  # best_val.pt.json -> best_val.pt
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if model.is_file() and "accuracy_flip" in meta:
            found.append((model, meta))
    if not found:
        raise FileNotFoundError(
            f"{output_dir} holds no best_<pack>.pt with its {BEST_SIDECAR_GLOB} sidecar: the run has not validated "
            "yet, or validation is off (validation.interval=0, validation.save_best=false, or no pack); "
            "check the training log, or evaluate a checkpoint with `megaface eval --checkpoint DIR --bin FILE`")
    return sorted(found, key=lambda item: -float(item[1]["accuracy_flip"]))


def pack_path(meta: dict[str, Any]) -> str | None:
    """The .bin that produced `meta["pack"]`: a configured validation bin, or the synthetic val.bin."""
    cfg = meta.get("config") or {}
    name = meta.get("pack")
    for path in (cfg.get("validation") or {}).get("bins") or []:
        if Path(path).stem == name:
            return str(path)
    data = cfg.get("data") or {}
    syn = data.get("synthetic") or {}
    if data.get("source") == "synthetic" and name == "val" and "cache_dir" in data:
        folder = synthetic_dir(Path(data["cache_dir"]).expanduser(), syn["identities"], syn["images_per_identity"],
                               syn["val_pairs"], syn["seed"])
        return str(folder / "val.bin")
    return None


def summarize(output_dir: str | Path, seconds: float | None = None) -> list[str]:
    """The summary lines for the run in `output_dir`."""
    model, meta = best_models(output_dir)[0]
    took = f" in {int(seconds) // 60} min {int(seconds) % 60:02d} s" if seconds is not None else ""
    lines = [(f"done{took}: best Accuracy-Flip {float(meta['accuracy_flip']):.5f} on {meta.get('pack')} "
              f"(identities not seen in training) at iteration {meta.get('iteration')}"),
             f"model: {model} ({meta.get('network')}, {meta.get('embedding_size')}-d; meta in {sidecar_path(model)})"]
    bin_path = pack_path(meta)
    evaluate = ["megaface", "eval", "--checkpoint", str(model), "--bin", bin_path or "lfw.bin"]
    lines.append(f"next: {shlex.join(evaluate)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megaface summary", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the run's --output directory")
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the run, for the first line")
    args = parser.parse_args(argv)
    print("\n".join(summarize(args.output_dir, args.seconds)))
    return 0
