"""The DeepSpeed JSON: the single source of truth for micro batch, accumulation, precision and clipping.

`load_ds_config` reads the file and applies `--ds.<key>=value` overrides (nested keys with dots, e.g.
`--ds.zero_optimization.stage=1`); `resolve_ds_config` cross-checks it against the job (world size, device)
before DeepSpeed sees it, so that mistakes fail early with the numbers named.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megaface.config.ds_schema import check_ds_config
from megaface.config.loader import parse_override

# Used when no JSON is given: ZeRO 0, fp32, no clipping (every value explicit, see gradient_clipping below).
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 64,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0,
    "zero_optimization": {"stage": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000_000,
}


def load_ds_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read the JSON (or the default) and apply `ds.` overrides ('--ds.a.b=v' or 'a.b=v')."""
    if path is None:
        ds = copy.deepcopy(DEFAULT_DS_CONFIG)
    else:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"DeepSpeed config {str(file)!r} does not exist (see ds_configs/*.json)")
        try:
            ds = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {file} is not valid JSON: {err}") from None
        if not isinstance(ds, dict):
            raise ValueError(f"DeepSpeed config {file}: top level must be an object")
    source = f"DeepSpeed config {path}" if path is not None else "the default DeepSpeed config"
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "ds":
            parts = parts[1:]
        if not parts:
            raise ValueError(f"override {text!r} names no DeepSpeed key (use --ds.<key>=value)")
        node = ds
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: '{part}' is not an object in the DeepSpeed config")
        node[parts[-1]] = value
    if overrides:
        source += " with the --ds. overrides"
    check_ds_config(ds, source)  # unknown keys and wrong types: DeepSpeed would ignore or crash on them
    return ds


def _section(ds: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The first of `keys` present (an object), or {}."""
    for key in keys:
        if key in ds:
            if not isinstance(ds[key], dict):
                raise ValueError(f"DeepSpeed config \"{key}\" must be an object, got {ds[key]!r}")
            return ds[key]
    return {}


def precision(ds: dict[str, Any]) -> str:
    """'fp16', 'bf16' or 'fp32' as the JSON requests."""
    fp16 = bool(_section(ds, "fp16").get("enabled", False))
    bf16 = bool(_section(ds, "bf16", "bfloat16").get("enabled", False))
    if fp16 and bf16:
        raise ValueError("the DeepSpeed config enables both fp16 and bf16: enable at most one")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def zero_stage(ds: dict[str, Any]) -> int:
    stage = _section(ds, "zero_optimization").get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ValueError(f"DeepSpeed config zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    return stage


def _positive_int(ds: dict[str, Any], key: str, default: int | None) -> int:
    value = ds.get(key, default)
    if value is None:
        raise ValueError(f"the DeepSpeed config must set '{key}'")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"DeepSpeed config '{key}'={value!r} must be a positive integer")
    return value


def resolve_ds_config(ds: dict[str, Any], world_size: int, device_type: str) -> dict[str, Any]:
    """Return a checked copy with train_batch_size filled in; raise ValueError on any inconsistency."""
    ds = copy.deepcopy(ds)
    check_ds_config(ds)
    micro = _positive_int(ds, "train_micro_batch_size_per_gpu", None)
    gas = _positive_int(ds, "gradient_accumulation_steps", 1)
    expected = micro * gas * world_size
    if "train_batch_size" in ds:
        total = _positive_int(ds, "train_batch_size", None)
        if total != expected:
            raise ValueError(
                f"DeepSpeed config train_batch_size={total} != train_micro_batch_size_per_gpu ({micro}) x "
                f"gradient_accumulation_steps ({gas}) x world size ({world_size}) = {expected}: fix the JSON "
                "or drop train_batch_size (it is then computed)")
    ds["train_batch_size"] = expected
    ds["gradient_accumulation_steps"] = gas
    if "gradient_clipping" not in ds:
        # DeepSpeed would silently default it to 1.0 and scale every update whose gradient norm exceeds 1
        raise ValueError("the DeepSpeed config must set 'gradient_clipping' explicitly (0.0 = off; "
                         "DeepSpeed otherwise clips at 1.0 without saying so)")
    clip = ds["gradient_clipping"]
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ValueError(f"DeepSpeed config gradient_clipping={clip!r} must be a number >= 0")
    prec = precision(ds)
    if prec == "fp16" and device_type == "cpu":
        raise ValueError("fp16 was requested (DeepSpeed config fp16.enabled=true) but this job runs on CPU, "
                         "where fp16 training is not supported: use a bf16 or fp32 config "
                         "(e.g. ds_configs/zero0_bf16.json) or run on a GPU")
    if "scheduler" in ds:  # (an "optimizer" section was checked and removed by check_optimizer_single_source)
        raise ValueError("the DeepSpeed config has a 'scheduler' section; megaface builds the lr schedule from the "
                         "experiment config's optim section (optim.schedule): remove 'scheduler'")
    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage} must be 0, 1, 2 or 3")
    ds["zero_allow_untested_optimizer"] = True  # SGD is "untested" for DeepSpeed's ZeRO but works
    ds.setdefault("steps_per_print", 1_000_000_000)  # megaface logs itself
    return ds


# ---- the optimizer: one source of truth ---------------------------------------------------------------------

# DeepSpeed "optimizer.type" values (lower-cased) that name what optim.name builds. DeepSpeed's "Adam" is AdamW
# unless params.adam_w_mode is false (its default is true).
_DS_OPTIMIZER_TYPES = {"sgd": ("sgd",), "adamw": ("adamw", "adam")}
# optim fields that a DeepSpeed "optimizer.params" may also carry, per optim.name.
_SHARED_PARAMS = {"sgd": ("lr", "momentum", "weight_decay"), "adamw": ("lr", "betas", "eps", "weight_decay")}


def check_optimizer_single_source(cfg: Any, ds: dict[str, Any]) -> dict[str, Any]:
    """Refuse a DeepSpeed "optimizer" section that disagrees with the experiment's optim section.

    The experiment config (`cfg.optim`: name, lr, momentum, betas, eps, weight_decay) is the single source of
    truth: megaface builds the backbone's optimizer (handed to deepspeed.initialize) and FC7's ShardSGD /
    ShardAdamW from it. A JSON copied from elsewhere may still carry
        "optimizer": {"type": "AdamW", "params": {"lr": ..., "betas": [...], "eps": ..., "weight_decay": ...}}
    Its type must name optim.name (SGD for sgd; AdamW, or Adam without adam_w_mode=false, for adamw), and every
    param it sets among lr / momentum (sgd) / betas / eps (adamw) / weight_decay must equal the YAML value;
    otherwise a ValueError lists each disagreement and the fix. Params it does not set are fine. The "scheduler"
    section is never accepted (the schedule is optim.schedule). Returns a copy of `ds` WITHOUT the optimizer
    section (an agreeing section is redundant, and DeepSpeed refuses an optimizer given twice).
    """
    section = ds.get("optimizer")
    out = {k: copy.deepcopy(v) for k, v in ds.items() if k != "optimizer"}
    if section is None:
        return out
    o = cfg.optim
    if not isinstance(section, dict):
        raise ValueError(f"DeepSpeed config 'optimizer' must be an object, got {section!r}")
    params = section.get("params") or {}
    problems = []
    kind = str(section.get("type", "")).lower()
    if kind not in _DS_OPTIMIZER_TYPES[o.name] or (kind == "adam" and params.get("adam_w_mode") is False):
        problems.append(f"type {section.get('type')!r} (with params.adam_w_mode={params.get('adam_w_mode')}) "
                        f"is not optim.name={o.name!r}")
    for key in _SHARED_PARAMS[o.name]:
        if key in params and not _same(params[key], getattr(o, key)):
            problems.append(f"params.{key}={params[key]!r} but optim.{key}={getattr(o, key)!r}")
    if problems:
        raise ValueError("the DeepSpeed config's 'optimizer' section disagrees with the experiment config: "
                         + "; ".join(problems) + ". The experiment's optim section is the single source of truth: "
                         "remove the 'optimizer' section from the JSON (or make it agree)")
    return out


def _same(json_value: Any, yaml_value: Any) -> bool:
    if isinstance(yaml_value, (tuple, list)):
        return isinstance(json_value, (tuple, list)) and len(json_value) == len(yaml_value) and all(
            _same(a, b) for a, b in zip(json_value, yaml_value, strict=False))
    if isinstance(json_value, bool) or not isinstance(json_value, (int, float)):
        return False
    return abs(float(json_value) - float(yaml_value)) <= 1e-12 * max(1.0, abs(float(yaml_value)))
