"""`megaface train`: the command line.

    megaface train --config launch/configs/quickstart.yaml [--ds-config ds_configs/zero1_bf16.json]
                   [--output DIR] [--max-steps N] [--save-every N] [--resume latest|auto|PATH]
                   [--section.key=value ...] [--ds.<json key>=value ...]

Any launcher works the same way (`deepspeed --module megaface train ...`, `torchrun -m megaface train ...`,
`mpirun ... python -m megaface train ...`, or plain `megaface train ...` for one process).
Iterations are counted from 0 in the log lines (as the seed prints them); a checkpoint tag step_N holds the
state after N completed iterations.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(flags, experiment overrides '--section.key=value', DeepSpeed overrides '--ds.key=value')."""
    parser = argparse.ArgumentParser(prog="megaface train",
                                     description="Train a face-recognition backbone (DeepSpeed) with a "
                                                 "model-parallel FC7 (Partial FC).",
                                     epilog="Overrides: --section.key=value (see megaface/config.py), "
                                            "--ds.<json key>=value for the DeepSpeed JSON.")
    parser.add_argument("--config", help="experiment YAML (launch/configs/*.yaml); defaults when omitted")
    parser.add_argument("--ds-config", help="DeepSpeed JSON (ds_configs/*.json); overrides train.ds_config")
    parser.add_argument("--output", help="run directory; overrides train.output_dir")
    parser.add_argument("--max-steps", type=int, help="training iterations; overrides train.max_steps")
    parser.add_argument("--save-every", type=int, help="checkpoint every N iterations; train.save_every")
    parser.add_argument("--resume", help="'latest', 'auto' (latest if the output directory has one, else a "
                        "fresh start) or a checkpoint directory; train.resume")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved experiment config (with each key's meaning) and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args, rest = parser.parse_known_args(argv)
    overrides: list[str] = []
    ds_overrides: list[str] = []
    for item in rest:
        if not (item.startswith("--") and "=" in item and "." in item.split("=", 1)[0]):
            parser.error(f"unrecognized argument {item!r} (overrides look like --section.key=value)")
        (ds_overrides if item.startswith("--ds.") else overrides).append(item)
    for flag, key in (("ds_config", "train.ds_config"), ("output", "train.output_dir"),
                      ("max_steps", "train.max_steps"), ("save_every", "train.save_every"),
                      ("resume", "train.resume")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"--{key}={value}")
    if args.max_steps is not None:
        overrides.append("--train.epochs=null")  # --max-steps replaces an epoch-based length
    return args, overrides, ds_overrides


def format_config(cfg: Any) -> str:
    """The resolved config as YAML, each key followed by its description as a comment."""
    from megaface.config import field_docs

    docs = field_docs()
    lines: list[str] = []

    def emit(tree: dict[str, Any], prefix: str, indent: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                lines.append(f"{indent}{key}:")
                emit(value, f"{prefix}{key}.", indent + "  ")
            else:
                doc = " ".join(docs.get(prefix + key, "").split())  # one line: a valid YAML comment
                lines.append(f"{indent}{key}: {json.dumps(value)}" + (f"  # {doc}" if doc else ""))

    emit(cfg.to_dict(), "", "")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from megaface.config import load_config, load_ds_config

    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides, ds_overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    ds_raw = load_ds_config(cfg.train.ds_config, ds_overrides)
    if args.print_config:
        print(format_config(cfg))
        print("# DeepSpeed JSON (micro batch, accumulation, precision, clipping; --ds.<key>=value):")
        print("\n".join("# " + line for line in json.dumps(ds_raw, indent=2).splitlines()))
        return 0
    from megaface.train.loop import run_training

    return run_training(cfg, ds_raw, [a for a in argv if not a.startswith("--local_rank")])


if __name__ == "__main__":
    sys.exit(main())
