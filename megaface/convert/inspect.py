"""`megaface convert inspect`: what a checkpoint holds, from its meta.json and its files.

The FC7 section is read from the shard files themselves (world size and class range of each), so a
checkpoint resharded with `fc7 --reshard` shows its new layout. Shard tensors are memory-mapped, not read,
so inspecting a multi-GB head is quick; DeepSpeed files are only listed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megaface.checkpoint import DS_DIR, TRAINER_DIR, read_meta, resolve_checkpoint

__all__ = ["inspect_checkpoint", "format_report"]


def _fc7_section(tag_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    from megaface.checkpoint.fc7_shards import load_checkpoint_shards
    from megaface.checkpoint.layout import FC7_DIR

    if not (tag_dir / FC7_DIR).is_dir():
        return {"parallel": meta.get("parallel", "data"), "shards": [],
                "note": "no fc7/ shards: the classifier is inside the DeepSpeed checkpoint (data parallel)"}
    states, names = load_checkpoint_shards(tag_dir, mmap=True)
    shards = [{"file": str(Path(n).relative_to(tag_dir)), "rank": int(s["rank"]),
               "class_start": int(s["class_start"]), "num_local": int(s["num_local"]),
               "momentum": s.get("momentum") is not None, "adamw": s.get("exp_avg") is not None}
              for s, n in zip(states, names)]
    first = states[0]
    return {"parallel": meta.get("parallel", "model"), "world_size": int(first["world_size"]),
            "num_classes": int(first["num_classes"]), "embedding_size": int(first["embedding_size"]),
            "hyper": first.get("hyper"), "shards": sorted(shards, key=lambda s: s["rank"])}


def _ds_section(tag_dir: Path) -> dict[str, Any]:
    """The DeepSpeed files and the layout their names imply (no file is loaded)."""
    ds_dir = tag_dir / DS_DIR
    files = sorted(p.name for p in ds_dir.iterdir()) if ds_dir.is_dir() else []
    if any(f.startswith("zero_pp_rank_") and f.endswith("_model_states.pt") for f in files):
        layout = "ZeRO-3 (parameters partitioned)"
    elif any(f.endswith("_optim_states.pt") for f in files):
        layout = "ZeRO-1/2 (optimizer state partitioned)"
    elif files:
        layout = "ZeRO-0 (unpartitioned)"
    else:
        layout = "missing"
    return {"dir": str(ds_dir), "layout": layout, "files": files}


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready summary of the checkpoint at `path` (an output dir, checkpoints dir or tag dir).

    Damaged FC7 shards do not stop the report: the error goes to `report["problems"]`."""
    tag_dir = resolve_checkpoint(path)
    meta = read_meta(tag_dir)
    keys = ("iteration", "network", "embedding_size", "num_classes", "world_size", "zero_stage", "precision",
            "parallel", "normalize", "megaface_version")
    report: dict[str, Any] = {"checkpoint": str(tag_dir), **{k: meta.get(k) for k in keys}}
    report["class_ranges"] = meta.get("class_ranges")
    if "fc7_world_size" in meta:
        report["fc7_world_size"] = meta["fc7_world_size"]
        report["fc7_resharded_from"] = meta.get("fc7_resharded_from")
    report["problems"] = []
    try:
        report["fc7"] = _fc7_section(tag_dir, meta)
    except (ValueError, FileNotFoundError) as err:  # still show the rest of a damaged checkpoint
        report["fc7"] = {"parallel": meta.get("parallel"), "shards": [], "note": "unreadable (see problems)"}
        report["problems"].append(str(err))
    report["deepspeed"] = _ds_section(tag_dir)
    trainer = tag_dir / TRAINER_DIR
    report["trainer_files"] = sorted(p.name for p in trainer.iterdir()) if trainer.is_dir() else []
    report["config"] = meta.get("config")
    report["ds_config"] = meta.get("ds_config")
    return report


def _line(label: str, value: Any) -> str:
    return f"  {label:<16} {value}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of `inspect_checkpoint`'s result."""
    lines = [f"checkpoint {report['checkpoint']}"]
    for key in ("iteration", "network", "embedding_size", "num_classes", "world_size", "zero_stage",
                "precision", "parallel", "normalize", "megaface_version"):
        lines.append(_line(key, report.get(key)))
    fc7 = report["fc7"]
    if fc7.get("shards"):
        lines.append(f"  fc7 shards       {len(fc7['shards'])} (world size {fc7['world_size']}, "
                     f"{fc7['num_classes']} classes x {fc7['embedding_size']})")
        for s in fc7["shards"]:
            end = s["class_start"] + s["num_local"]
            lines.append(f"    rank {s['rank']:<4} classes [{s['class_start']}, {end})  {s['num_local']} rows"
                         f"{'  + momentum' if s['momentum'] else ''}{'  + AdamW moments' if s.get('adamw') else ''}"
                         f"  {s['file']}")
        if "fc7_resharded_from" in report:
            lines.append(f"    (resharded from world size {report['fc7_resharded_from']})")
    else:
        lines.append(f"  fc7              {fc7.get('note')}")
    ds = report["deepspeed"]
    lines.append(_line("deepspeed", f"{ds['layout']}: {', '.join(ds['files'])}"))
    lines.append(_line("trainer", ", ".join(report["trainer_files"]) or "-"))
    for problem in report.get("problems", []):
        lines.append(f"  PROBLEM          {problem}")
    if report.get("config") is not None:
        lines.append("  config:")
        text = json.dumps(report["config"], indent=2, sort_keys=True)
        lines += ["    " + line for line in text.splitlines()]
    return "\n".join(lines)
