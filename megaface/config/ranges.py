"""The allowed range of every numeric experiment-config value, checked when the config is loaded.

`RANGES` is the documentation: 'section.key' -> (low, high, low_open, high_open). A value outside its range
is a ValueError naming the key, the value and the range; NaN and infinity are rejected for every float.
List fields (head.margin, optim.milestones, ...) are checked element by element; None ("use the default")
always passes. `WARNINGS` lists values that are legal but rarely meant; they are reported, not rejected.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from megaface.head.adaface import ADAFACE_RANGES
from megaface.head.margin import MARGIN_RANGES
from megaface.head.partial_fc import HEAD_RANGES
from megaface.utils.ranges import Range, check_range, range_text

INF = math.inf

# 'section.key' -> (low, high, low excluded, high excluded)
RANGES: dict[str, Range] = {
    "model.embedding_size": (1, INF, False, False),
    "model.dropout": (0.0, 1.0, False, True),
    "model.drop_path_rate": (0.0, 1.0, False, True),  # ViT stochastic depth
    "model.mask_ratio": (0.0, 1.0, False, True),  # ViT random patch masking in training
    "model.bn_eps": (0.0, 1.0, True, True),  # CNN BatchNorm eps; arcface_torch's is 1e-5
    # margin (m1, m2, m3), AdaFace, sub-centers and scale: the head's own rules, which its constructors check too
    **MARGIN_RANGES,
    **ADAFACE_RANGES,
    **HEAD_RANGES,
    "head.sample_rate": (0.0, 1.0, True, False),
    "head.num_sample": (1, INF, False, True),
    "head.num_classes": (1, INF, False, True),
    "head.lr_scale": (0.0, INF, False, True),
    "head.interclass_filtering_threshold": (0.0, 1.0, False, True),  # a cosine bound; 0 = off
    "head.init_std": (0.0, INF, True, True),  # FC7 rows start as N(0, init_std)
    "head.clip_grad_norm": (0.0, INF, False, True),  # None = the JSON's gradient_clipping, 0 = off
    "data.synthetic.identities": (2, INF, False, True),
    "data.synthetic.images_per_identity": (1, INF, False, True),
    "data.synthetic.val_pairs": (0, INF, False, True),
    "data.synthetic.seed": (0, INF, False, True),
    "data.workers": (0, 256, False, False),
    "data.seed": (0, INF, False, True),
    "data.part_num": (1, INF, False, True),
    "data.augment.crop_p": (0.0, 1.0, False, False),
    "data.augment.crop_scale[]": (0.0, 1.0, True, False),
    "data.augment.crop_ratio[]": (0.0, INF, True, True),
    "data.augment.lowres_p": (0.0, 1.0, False, False),
    "data.augment.lowres_side[]": (0.0, 1.0, True, False),
    "data.augment.blur_p": (0.0, 1.0, False, False),
    "data.augment.blur_sigma[]": (0.0, 10.0, True, False),
    "data.augment.photometric_p": (0.0, 1.0, False, False),
    "data.augment.brightness": (0.0, 1.0, False, False),
    "data.augment.contrast": (0.0, 1.0, False, False),
    "data.augment.saturation": (0.0, 1.0, False, False),
    "data.augment.hsv_p": (0.0, 1.0, False, False),
    "data.augment.hsv_hue[]": (-180.0, 180.0, False, False),
    "data.augment.hsv_saturation[]": (0.0, INF, False, True),
    "data.augment.gray_p": (0.0, 1.0, False, False),
    "data.part_name_suffix_length": (1, 64, False, False),
    "optim.lr": (0.0, INF, False, True),
    "optim.momentum": (0.0, 1.0, False, True),
    "optim.weight_decay": (0.0, INF, False, True),
    "optim.warmup_steps": (0, INF, False, True),
    "optim.warmup_epochs": (0.0, INF, False, True),
    "optim.betas[]": (0.0, 1.0, False, True),  # AdamW
    "optim.eps": (0.0, INF, True, True),  # AdamW
    "optim.power": (0.0, INF, True, True),  # polynomial schedule
    "optim.milestones[]": (1, INF, False, True),
    "optim.milestone_epochs[]": (0.0, INF, True, True),
    "optim.gamma": (0.0, INF, True, True),
    "train.max_steps": (1, INF, False, True),
    "train.epochs": (0.0, INF, True, True),
    "train.save_every": (0, INF, False, True),
    "train.keep_last": (0, INF, False, True),
    "train.log_every": (1, INF, False, True),
    "train.throughput_window": (1, INF, False, True),
    "train.seed": (0, INF, False, True),
    "train.collective_timeout_s": (0.0, INF, True, True),
    "train.save_every_minutes": (0.0, INF, False, True),  # 0 = off
    "train.rewind_lr_factor": (0.0, 1.0, True, False),
    "train.rewind_cooldown_steps": (0, INF, False, True),
    "train.max_rewinds": (0, INF, False, True),
    "train.threads": (0, 4096, False, False),
    "validation.interval": (0, INF, False, True),
    "validation.batch_size": (1, INF, False, True),
}

# 'section.key' -> (is it suspicious?, why it is probably not meant)
WARNINGS: dict[str, tuple[Callable[[float], bool], str]] = {
    "optim.gamma": (lambda v: v > 1, ("the learning rate grows at each milestone; decay factors are < 1 "
                                      "(e.g. 0.1)")),
    "optim.momentum": (lambda v: 0 < v < 0.5, "SGD momentum for face recognition is usually 0.9"),
    "head.scale": (lambda v: v < 8, "with s < 8 the softmax cannot become confident; ArcFace uses 64"),
}


def range_docs() -> dict[str, str]:
    """'section.key' -> 'range (0, inf)' ('range [0]: ..., [1]: ...' per position, 'range of each value ...')."""
    parts: dict[str, list[str]] = {}
    for key, rule in RANGES.items():
        field, _, index = key.partition("[")
        prefix = "of each value " if index == "]" else f"[{index}: " if index else ""
        parts.setdefault(field, []).append(prefix + range_text(*rule))
    return {field: "range " + ", ".join(texts) for field, texts in parts.items()}


def _check(name: str, value: Any, rule: Range) -> None:
    check_range(name, value, rule, f"fix it in the YAML or with --{name.split('[')[0]}=...")


def _values(cfg: Any, key: str) -> list[tuple[str, Any]]:
    """(name, value) pairs to check for one RANGES key; [] for None."""
    path = key.split("[")[0]
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    if value is None or isinstance(value, str):  # None = the default; a name (head.margin=adaface) has no range
        return []
    if key.endswith("[]"):
        return [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    if "[" in key:
        return [(key, value[int(key.split("[")[1].rstrip("]"))])]
    return [(key, value)]


def check_ranges(cfg: Any) -> None:
    """Raise ValueError on the first numeric value outside RANGES; warn on the values in WARNINGS."""
    for key, rule in RANGES.items():
        for name, value in _values(cfg, key):
            _check(name, value, rule)
    for key, (suspicious, why) in WARNINGS.items():
        for name, value in _values(cfg, key):
            if suspicious(value):
                warnings.warn(f"{name}={value!r}: {why}", UserWarning, stacklevel=3)
