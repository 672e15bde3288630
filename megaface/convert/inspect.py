"""`megaface convert inspect`: what a checkpoint holds, from its meta.json and its files.

The FC7 section is read from the shard files themselves (world size and class range of each), so a
checkpoint resharded with `fc7 --reshard` shows its new layout. Shard tensors are memory-mapped, not read,
so inspecting a multi-GB head is quick; DeepSpeed files are only listed.

Integrity: every file is compared with the sha256 digests meta.json records (reads every byte once), a
missing ds/ part or an unverified (older or diverged) checkpoint is a problem, and `verify=True` also
loads every tensor and checks it is finite. Any problem makes `megaface convert inspect` exit 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megaface.checkpoint import DS_DIR, META_FILE, TRAINER_DIR, read_meta, resolve_checkpoint
from megaface.checkpoint.integrity import (
    FILES_KEY,
    FINITE_KEY,
    finite_problems,
    missing_ds_problem,
    unlisted_files,
    verify_files,
)
from megaface.checkpoint.layout import DS_OPTIM_FILE, DS_ZERO3_MODEL_FILE

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
              for s, n in zip(states, names, strict=False)]
    first = states[0]
    return {"parallel": meta.get("parallel", "model"), "world_size": int(first["world_size"]),
            "num_classes": int(first["num_classes"]), "embedding_size": int(first["embedding_size"]),
            "subcenters": int(first.get("subcenters", 1)),
            "weight_dtype": str(first["weight"].dtype).removeprefix("torch."),
            "momentum_dtype": None if first.get("momentum") is None else str(first["momentum"].dtype).removeprefix("torch."),
            "hyper": first.get("hyper"), "shards": sorted(shards, key=lambda s: s["rank"])}


def _ds_section(tag_dir: Path) -> dict[str, Any]:
    """The DeepSpeed files and the layout their names imply (no file is loaded)."""
    ds_dir = tag_dir / DS_DIR
    files = sorted(p.name for p in ds_dir.iterdir()) if ds_dir.is_dir() else []
    if any(DS_ZERO3_MODEL_FILE.match(f) for f in files):
        layout = "ZeRO-3 (parameters partitioned)"
    elif any(DS_OPTIM_FILE.match(f) for f in files):
        layout = "ZeRO-1/2 (optimizer state partitioned)"
    elif files:
        layout = "ZeRO-0 (unpartitioned)"
    else:
        layout = "missing"
    return {"dir": str(ds_dir), "layout": layout, "files": files}


def _integrity_problems(tag_dir: Path, meta: dict[str, Any], verify: bool) -> list[str]:
    problems = [p for p in [missing_ds_problem(tag_dir)] if p is not None]
    expected = meta.get(FILES_KEY)
    if expected:
        problems += verify_files(tag_dir, expected) + unlisted_files(tag_dir, expected)
    else:
        problems.append(f"{tag_dir / META_FILE} records no file digests (saved by an older megaface): "
                        "its files cannot be verified; `--verify` still checks the tensors")
    if not meta.get(FINITE_KEY):
        problems.append(f"{tag_dir}: meta.json does not say the weights were verified finite when saved; run "
                        "`megaface convert inspect --verify` to check the tensors")
    if verify:
        problems += finite_problems(tag_dir)
    return problems


def inspect_checkpoint(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """A JSON-ready summary of the checkpoint at `path` (an output dir, checkpoints dir or tag dir).

    Damaged files do not stop the report: every problem goes to `report["problems"]` (one line each).
    `verify=True` also reads every tensor and reports inf/NaN."""
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
    report["verified_finite"] = bool(meta.get(FINITE_KEY))
    report["problems"] += _integrity_problems(tag_dir, meta, verify)
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
                     f"{fc7['num_classes']} classes x {fc7['embedding_size']}"
                     f"{f', {sub} sub-centers per class' if (sub := fc7.get('subcenters', 1)) > 1 else ''}; "
                     f"weight {fc7.get('weight_dtype')}, momentum {fc7.get('momentum_dtype') or '-'})")
        for s in fc7["shards"]:
            end = s["class_start"] + s["num_local"]
            rows = s["num_local"] * fc7.get("subcenters", 1)
            lines.append(f"    rank {s['rank']:<4} classes [{s['class_start']}, {end})  {rows} rows"
                         f"{'  + momentum' if s['momentum'] else ''}{'  + AdamW moments' if s.get('adamw') else ''}"
                         f"  {s['file']}")
        if "fc7_resharded_from" in report:
            lines.append(f"    (resharded from world size {report['fc7_resharded_from']})")
    else:
        lines.append(f"  fc7              {fc7.get('note')}")
    ds = report["deepspeed"]
    lines.append(_line("deepspeed", f"{ds['layout']}: {', '.join(ds['files'])}"))
    lines.append(_line("trainer", ", ".join(report["trainer_files"]) or "-"))
    lines.append(_line("integrity", "problems below" if report.get("problems") else
                       "ok (sha256 of every file matches meta.json, saved verified finite)"))
    for problem in report.get("problems", []):
        lines.append(f"  PROBLEM          {problem}")
    if report.get("config") is not None:
        lines.append("  config:")
        text = json.dumps(report["config"], indent=2, sort_keys=True)
        lines += ["    " + line for line in text.splitlines()]
    return "\n".join(lines)
