"""Experiment settings: the YAML experiment config and the DeepSpeed JSON, each loaded and checked once.

Modules:
    loader.py     YAML + `--section.key=value` overrides -> a validated `ExperimentConfig`; `field_docs`
    sections.py   the sections as frozen dataclasses, one docstring per field
    ranges.py     the allowed range of every numeric value (`RANGES`) and the legal-but-odd ones (`WARNINGS`)
    ds_json.py    the DeepSpeed JSON: load with `--ds.` overrides, cross-check against the job, one source of
                  truth for the optimizer
    ds_schema.py  the DeepSpeed JSON's keys and types, read from DeepSpeed's own config models

Everything a caller needs is importable from `megaface.config`.
"""

from megaface.config.ds_json import (
                                     DEFAULT_DS_CONFIG,
                                     check_optimizer_single_source,
                                     load_ds_config,
                                     precision,
                                     resolve_ds_config,
                                     zero_stage,
)
from megaface.config.loader import field_docs, load_config, parse_override, validate
from megaface.config.sections import (
                                     DataConfig,
                                     ExperimentConfig,
                                     HeadConfig,
                                     ModelConfig,
                                     OptimConfig,
                                     SyntheticConfig,
                                     TrainConfig,
                                     ValidationConfig,
)

__all__ = ["DEFAULT_DS_CONFIG", "DataConfig", "ExperimentConfig", "HeadConfig", "ModelConfig", "OptimConfig",
           "SyntheticConfig", "TrainConfig", "ValidationConfig", "check_optimizer_single_source", "field_docs",
           "load_config", "load_ds_config", "parse_override", "precision", "resolve_ds_config", "validate",
           "zero_stage"]
