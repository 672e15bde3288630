"""The keys and value types DeepSpeed knows, so that a typo in the DeepSpeed JSON is an error, not a no-op.

DeepSpeed ignores top-level keys it does not read (`"zero_optimisation": {"stage": 2}` silently trains with
ZeRO 0) and crashes with an AttributeError or TypeError on a section of the wrong type (`"bf16": true`).
`check_ds_config` turns both into one-line ValueErrors naming the key, the nearest valid key and the fix.

Where the known keys come from (DeepSpeed 0.19.x, derived at run time, so a newer DeepSpeed's keys are known):
- top level: the keys `deepspeed.runtime.config.DeepSpeedConfig` reads, recorded by handing it a dict that
  notes every lookup, plus a vetted list (sections read elsewhere, e.g. optimizer, activation_checkpointing,
  flops_profiler, autotuning, aio); the vetted list alone when DeepSpeed cannot be imported;
- `zero_optimization`, `fp16`, `bf16`: DeepSpeed's own pydantic models (`DeepSpeedZeroConfig`,
  `DeepSpeedFP16Config`, `DeepSpeedBF16Config`), which forbid extra keys; their field names and aliases are
  the valid names offered in the did-you-mean hint.
"""

from __future__ import annotations

import difflib
import functools
import json
from typing import Any

# Top-level keys of DeepSpeed 0.19 (docs "DeepSpeed Configuration JSON" + deepspeed.runtime.constants).
_VETTED_TOP_LEVEL = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "gradient_clipping",
    "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op", "communication_data_type",
    "seq_parallel_communication_data_type", "sparse_gradients", "zero_optimization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing",
    "flops_profiler", "autotuning", "aio", "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet",
    "elasticity", "data_efficiency", "curriculum_learning", "compression_training", "checkpoint",
    "data_types", "sparse_attention", "pipeline", "eigenvalue", "progressive_layer_drop", "quantize_training",
    "nebula", "hybrid_engine", "weight_quantization", "compile", "steps_per_print", "wall_clock_breakdown",
    "memory_breakdown", "dump_state", "dataloader_drop_last", "disable_allgather", "disable_python_gc",
    "vocabulary_size", "timers", "tensor_parallel", "expert_parallel", "graph_harvesting", "log_level",
    "managed_gradient_accumulation", "use_data_before_expert_parallelism", "datastates_ckpt",
})

# Sections whose value must be a JSON object, with an example for the error message.
_OBJECT_EXAMPLES = {
    "fp16": '{"enabled": true}', "bf16": '{"enabled": true}', "bfloat16": '{"enabled": true}',
    "zero_optimization": '{"stage": 2}', "optimizer": '{"type": "SGD", "params": {...}}',
    "scheduler": '{"type": "WarmupLR", "params": {...}}',
}
_OBJECT_SECTIONS = frozenset(_OBJECT_EXAMPLES) | {
    "amp", "torch_autocast", "activation_checkpointing", "flops_profiler", "autotuning", "aio",
    "comms_logger", "tensorboard", "wandb", "csv_monitor", "comet", "elasticity", "data_efficiency",
    "curriculum_learning", "compression_training", "checkpoint", "data_types", "sparse_attention", "nebula",
    "hybrid_engine", "weight_quantization", "compile", "timers", "tensor_parallel", "expert_parallel",
}
_INT_KEYS = frozenset({"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                       "steps_per_print"})
_NUMBER_KEYS = frozenset({"gradient_clipping", "gradient_predivide_factor"})
_BOOL_KEYS = frozenset({"prescale_gradients", "sparse_gradients", "zero_allow_untested_optimizer",
                        "zero_force_ds_cpu_optimizer", "wall_clock_breakdown", "memory_breakdown", "dump_state",
                        "dataloader_drop_last", "disable_allgather", "disable_python_gc"})


def _recorded_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeedConfig looks up while parsing a minimal config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class _Recorder(dict):
        def get(self, key: Any, default: Any = None) -> Any:
            seen.add(key)
            return super().get(key, default)

        def __getitem__(self, key: Any) -> Any:
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key: object) -> bool:
            seen.add(key)  # type: ignore[arg-type]
            return super().__contains__(key)

    DeepSpeedConfig(_Recorder({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}))
    return frozenset(k for k in seen if isinstance(k, str))


@functools.lru_cache(maxsize=1)
def known_top_level_keys() -> frozenset[str]:
    try:
        return _VETTED_TOP_LEVEL | _recorded_top_level_keys()
    except Exception:  # noqa: BLE001  (DeepSpeed missing or its internals changed: the vetted list still works)
        return _VETTED_TOP_LEVEL


@functools.lru_cache(maxsize=1)
def section_models() -> dict[str, Any]:
    """Section name -> DeepSpeed's pydantic model for it (empty when DeepSpeed cannot be imported)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception:  # noqa: BLE001  (no DeepSpeed: only the top-level keys are checked)
        return {}
    return {"zero_optimization": DeepSpeedZeroConfig, "fp16": DeepSpeedFP16Config,
            "bf16": DeepSpeedBF16Config, "bfloat16": DeepSpeedBF16Config}


def _nearest(key: str, valid: Any, prefix: str = "") -> str:
    near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{near[0]}'?" if near else ""


def _json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _model_names(model: Any) -> set[str]:
    names = set(model.model_fields)
    names |= {f.alias for f in model.model_fields.values() if f.alias}
    return names


def _submodel(model: Any, loc: tuple[Any, ...]) -> Any:
    """The pydantic model that holds the field at `loc` (nested sections such as offload_param)."""
    import typing

    from pydantic import BaseModel

    for part in loc:
        by_name = {n: f for n, f in model.model_fields.items()} | \
                  {f.alias: f for f in model.model_fields.values() if f.alias}
        field = by_name.get(part)
        if field is None:
            return model
        inner = [a for a in (typing.get_args(field.annotation) or (field.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return model
        model = inner[0]
    return model


def _check_section(name: str, section: dict[str, Any], model: Any, source: str) -> None:
    from pydantic import ValidationError

    try:
        model.model_validate(section)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first["loc"])
        key = ".".join([name, *map(str, loc)])
        if first["type"] == "extra_forbidden":
            valid = _model_names(_submodel(model, loc[:-1]))
            parent = ".".join([name, *map(str, loc[:-1])])
            listing = f" (valid keys under '{parent}': {', '.join(sorted(valid))})" if len(valid) <= 12 else ""
            raise ValueError(f"{source}: unknown key '{key}'{_nearest(str(loc[-1]), valid, parent + '.')}"
                             f"{listing}; DeepSpeed rejects it") from None
        raise ValueError(f"{source}: \"{key}\": {_json(first.get('input'))} is invalid: {first['msg']}; "
                         "fix the value (see DeepSpeed's config documentation)") from None


def _check_scalar(key: str, value: Any, source: str) -> None:
    if key in _INT_KEYS and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{source}: \"{key}\" must be an integer, got {_json(value)}")
    if key in _NUMBER_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{source}: \"{key}\" must be a number, got {_json(value)}")
    if key in _BOOL_KEYS and not isinstance(value, bool):
        raise ValueError(f"{source}: \"{key}\" must be true or false, got {_json(value)}")


def check_ds_config(ds: dict[str, Any], source: str = "DeepSpeed config") -> None:
    """Raise ValueError (one line: key, nearest valid key or expected type, fix) on the first problem."""
    known = known_top_level_keys()
    models = section_models()
    for key, value in ds.items():
        if key not in known:
            raise ValueError(f"{source}: unknown key '{key}'{_nearest(str(key), known)} "
                             "(DeepSpeed would ignore it without a word)")
        if key in _OBJECT_SECTIONS and not isinstance(value, dict):
            example = _OBJECT_EXAMPLES.get(key, "{...}")
            raise ValueError(f"{source}: \"{key}\" must be an object such as {example}, got {_json(value)}")
        _check_scalar(key, value, source)
        if key in models:
            _check_section(key, value, models[key], source)
