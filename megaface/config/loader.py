"""Experiment configuration: typed dataclasses loaded from YAML, with `--section.key=value` overrides.

Precedence: command line > YAML file > dataclass default. Everything is validated when loaded: an unknown
section or key is a ValueError naming it and the nearest valid one; values are coerced to the declared type
or rejected. Relative paths written in a YAML file resolve against that file's directory (so a config works
from any working directory); relative paths given on the command line resolve against the working directory.

Values that DeepSpeed also reads (micro batch, gradient accumulation, precision, gradient clipping) are NOT
fields here: the DeepSpeed JSON is their single source of truth (see `megaface.config.ds_json`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from megaface import vocab
from megaface.config.ranges import check_ranges, range_docs
from megaface.config.sections import ExperimentConfig, OptimConfig, _to_plain
from megaface.data.device_decode import check_input_path
from megaface.head.margin import resolve_margin

# the section classes are exported by the package (`megaface.config`), where callers import them from
__all__ = ["field_docs", "load_config", "parse_override", "validate"]


# ---- coercion and validation --------------------------------------------------------------------------

def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the declared type, or raise ValueError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        named = [a for a in inner if typing.get_origin(a) is typing.Literal and value in typing.get_args(a)]
        return _coerce(value, (named or inner)[0], where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value] if origin is list else value
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is typing.Literal:  # a choice set from megaface.vocab
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            value = "on" if value else "off"
        if value not in args:
            near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"{where}={value!r} is not one of {list(args)}{hint_text}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _unknown(key: str, valid: list[str], where: str) -> ValueError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{near[0]}'?" if near else ""
    return ValueError(f"unknown config key '{where}{key}'{hint} (valid keys under '{where or '<top>'}': "
                      f"{', '.join(valid)})")


def _build(cls: type, raw: dict[str, Any], base: Path | None, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"config section '{where.rstrip('.') or '<top>'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown(str(key), list(fields), where)
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, base, f"{where}{key}.")
            continue
        if where == "head." and key == "margin" and isinstance(value, str) and value not in vocab.ADAPTIVE_MARGINS:
            value = resolve_margin(value, "head.margin", vocab.ADAPTIVE_MARGINS)
        value = _coerce(value, hint, f"{where}{key}")
        if fields[key].metadata.get("path"):
            value = _resolve_paths(value, base)
        kwargs[key] = value
    return cls(**kwargs)


def _resolve_paths(value: Any, base: Path | None) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_resolve_paths(v, base) for v in value]
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Ranges (megaface.config.ranges) and cross-field checks; raises ValueError naming key, constraint, fix."""
    check_ranges(cfg)
    _check_choices(cfg, "")
    t, o, h = cfg.train, cfg.optim, cfg.head
    if (t.max_steps is None) == (t.epochs is None):
        raise ValueError(f"set exactly one of train.max_steps and train.epochs (got max_steps={t.max_steps}, "
                         f"epochs={t.epochs})")
    if o.milestones and o.milestone_epochs:
        raise ValueError("set optim.milestones (iterations) or optim.milestone_epochs, not both")
    if sorted(o.milestones) != list(o.milestones) or sorted(o.milestone_epochs) != list(o.milestone_epochs):
        raise ValueError(f"optim milestones must be increasing, got {o.milestones or o.milestone_epochs}")
    _validate_optim(o)
    if h.num_sample is not None and h.sample_rate != 1.0:
        raise ValueError(f"set head.num_sample={h.num_sample} or head.sample_rate={h.sample_rate}, not both "
                         "(num_sample is the seed's count form of the same setting)")
    if h.parallel == "data" and (h.sample_rate < 1.0 or h.num_sample is not None):
        raise ValueError("head.sample_rate < 1 or head.num_sample (Partial FC) needs head.parallel=model")
    if h.parallel == "data" and h.momentum_dtype != "fp32":
        raise ValueError(f"head.momentum_dtype={h.momentum_dtype!r} needs head.parallel=model (a data-parallel FC7 "
                         "lives in the DeepSpeed engine, whose optimizer keeps its own momentum): drop the key")
    if h.weight_dtype != "fp32" and (h.parallel == "data" or o.name != "sgd"):
        raise ValueError(f"head.weight_dtype={h.weight_dtype!r} needs head.parallel=model and optim.name=sgd (got "
                         f"parallel={h.parallel!r}, optim.name={o.name!r}): ShardSGD alone updates a bf16 master "
                         "weight; set head.weight_dtype=fp32")
    if h.clip_grad_norm is not None and h.parallel == "data":
        raise ValueError("head.clip_grad_norm needs head.parallel=model: a data-parallel FC7 lives in the "
                         "DeepSpeed engine and is clipped with the backbone by the JSON's gradient_clipping")
    if cfg.data.source != "synthetic" and not cfg.data.path:
        raise ValueError(f"data.source={cfg.data.source!r} needs data.path (the pack or folder to train on)")
    d = cfg.data
    check_input_path(d.decode, d.strict_decode, d.prepare, d.augment.enabled)
    for name in ("part_num", "part_name_suffix_length"):
        value = getattr(d, name)
        if value is not None and d.source != "ofrecord":
            raise ValueError(f"data.{name}={value} applies to data.source=ofrecord only (data.source is "
                             f"{d.source!r}); drop it")
    return cfg


def _check_choices(section: Any, where: str) -> None:
    """Every field typed with a megaface.vocab Literal holds one of its values (also for configs built in code)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            _check_choices(value, f"{where}{f.name}.")
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            _coerce(value, hints[f.name], f"{where}{f.name}")


def _validate_optim(o: OptimConfig) -> None:
    """Cross-field checks of the optim section (single values: megaface.config.ranges)."""
    if o.warmup_steps and o.warmup_epochs:
        raise ValueError("set optim.warmup_steps (iterations) or optim.warmup_epochs, not both")
    if o.schedule == "polynomial" and (o.milestones or o.milestone_epochs):
        raise ValueError(f"optim.schedule=polynomial takes no milestones "
                         f"(got {o.milestones or o.milestone_epochs}); remove them or use schedule=step")


# ---- loading ------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """'--a.b=value' or 'a.b=value' -> (['a', 'b'], value parsed as YAML: 64 -> int, [1,2] -> list)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ValueError(f"override {text!r} must look like --section.key=value")
    key, raw = body.split("=", 1)
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"override {text!r}: empty key component in '{key}'")
    try:
        return parts, yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"override {text!r}: the value of '{key}' is not valid YAML ({problem}); quote it or "
                         "fix its brackets, e.g. --optim.milestones=[1,2] or --train.output_dir=\"a b\"") from None


def _set_nested(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _cli_paths(tree: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> None:
    """Resolve relative paths given on the command line against the working directory."""
    for parts, _ in overrides:
        cls: Any = ExperimentConfig
        for part in parts[:-1]:
            hints = typing.get_type_hints(cls)
            if part not in hints or not dataclasses.is_dataclass(hints[part]):
                return
            cls = hints[part]
        fmap = {f.name: f for f in dataclasses.fields(cls)}
        if parts[-1] in fmap and fmap[parts[-1]].metadata.get("path"):
            node = tree
            for part in parts[:-1]:
                node = node[part]
            node[parts[-1]] = _resolve_paths(node[parts[-1]], Path.cwd())


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a YAML experiment file (or defaults when path is None), apply dotted overrides, validate."""
    tree: dict[str, Any] = {}
    base: Path | None = None
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file {str(file)!r} does not exist (pass --config <experiment>.yaml)")
        with open(file, encoding="utf-8") as fh:
            tree = yaml.safe_load(fh) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"config file {file}: top level must be a mapping of sections")
        base = file.resolve().parent
    cfg = _build(ExperimentConfig, tree, base, "")  # validates the file's keys against the file's paths
    parsed = [parse_override(o) for o in overrides]
    if parsed:
        merged = _to_plain(dataclasses.asdict(cfg))
        for parts, value in parsed:
            _set_nested(merged, parts, value)
        _cli_paths(merged, parsed)
        cfg = _build(ExperimentConfig, merged, None, "")
    return validate(cfg)


def field_docs(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, str]:
    """'section.key' -> one-line description (from the attribute docstrings in this file)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)):
            docs[prefix + node.target.id] = str(nxt.value.value)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
        elif "doc" in f.metadata:
            docs[prefix + f.name] = f.metadata["doc"]
    if not prefix:  # the checked range of every numeric value is part of its description
        docs.update({key: f"{docs.get(key, '')} ({text})".strip() for key, text in range_docs().items()})
    return docs
