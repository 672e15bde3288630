"""The named choices users write in configs and on command lines, each defined once.

Each choice set is a `Literal[...]` alias and the tuple of its values (`get_args` of the alias, so the two
cannot drift). Config fields are typed with the alias, and loading a config checks a value against it
(megaface.config.loader); the modules that act on a value import the same tuple or alias. Bottom layer:
imports nothing from megaface.
"""

from __future__ import annotations

from typing import Literal, get_args

NormalizeMode = Literal["arcface_torch", "oneflow"]
"""Pixel normalisation of uint8 RGB: arcface_torch = (x/255 - 0.5)/0.5 (InsightFace PyTorch),
oneflow = (x - 127.5)/128 (the OneFlow seed). Must match how the model was trained."""
NORMALIZE_MODES: tuple[str, ...] = get_args(NormalizeMode)

DecodeMode = Literal["cpu", "gpu"]
"""Where training JPEGs are decoded: cpu = libjpeg-turbo in the loader workers; gpu = nvJPEG on the training
device (torchvision), the workers only read and check headers (megaface.data.device_decode)."""
DECODE_MODES: tuple[str, ...] = get_args(DecodeMode)

PrepareMode = Literal["device", "host"]
"""Where a training batch is flipped, augmented and normalised: device = uint8 batches cross to the training
device and it does the rest in the backbone's dtype; host = the loader's process normalises to float32 and the
float batch crosses (the former path, 4x the bytes; no data.augment, no data.decode=gpu)."""
PREPARE_MODES: tuple[str, ...] = get_args(PrepareMode)

DataSource = Literal["synthetic", "recordio", "folder", "ofrecord"]
"""Training data: built-in synthetic identities, an InsightFace RecordIO pack (train.rec/.idx/property),
an image folder (one sub-folder per identity), or a OneFlow OFRecord directory (part-N files)."""
DATA_SOURCES: tuple[str, ...] = get_args(DataSource)

CleanFormat = Literal["recordio", "ofrecord"]
"""What `megaface clean` writes: an InsightFace RecordIO pack (train.rec/.idx/property) or OFRecord part files;
by default the format of the pack it cleans."""
CLEAN_FORMATS: tuple[str, ...] = get_args(CleanFormat)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp")
"""Image files taken from folders (training folders, `megaface embed --images`, `megaface pack rec`)."""

HeadParallel = Literal["model", "data"]
"""FC7 placement: "model" = rows sharded over ranks with their own optimizer; "data" = replicated inside
the DeepSpeed engine (the seed's data-parallel runs)."""
HEAD_PARALLEL: tuple[str, ...] = get_args(HeadParallel)

MARGIN_PRESETS: dict[str, tuple[float, float, float]] = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.35),
    "combined": (1.0, 0.3, 0.2),
    "sphereface": (1.35, 0.0, 0.0),
}
"""Combined-margin presets (m1, m2, m3): target logit cos(m1*theta + m2) - m3."""

AlignOutput = Literal["folder", "pack"]
"""`megaface align` output: a folder of crops (same relative names), or a RecordIO pack (needs labels)."""
ALIGN_OUTPUTS: tuple[str, ...] = get_args(AlignOutput)

IjbPooling = Literal["arcface_torch", "unit"]
"""IJB template features: arcface_torch = eval_ijbc.py's (image norm kept, image x detector score, media mean,
template sum, L2); unit = every image L2-normalised, no score, media mean, template mean, L2."""
IJB_POOLINGS: tuple[str, ...] = get_args(IjbPooling)

AdaptiveMargin = Literal["adaface"]
"""head.margin values that are not an (m1, m2, m3) triple: adaface (megaface.head.adaface)."""
ADAPTIVE_MARGINS: tuple[str, ...] = get_args(AdaptiveMargin)

ProgressMode = Literal["auto", "on", "off"]
"""Progress bar: auto = on a terminal only; on; off."""
PROGRESS_MODES: tuple[str, ...] = get_args(ProgressMode)

ComputeDtype = Literal["auto", "fp32", "bf16", "fp16"]
"""FC7 GEMM operand dtype; auto = follow the DeepSpeed JSON's precision."""
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)

MomentumDtype = Literal["fp32", "bf16"]
"""Storage dtype of the FC7 optimizer's momentum."""
MOMENTUM_DTYPES: tuple[str, ...] = get_args(MomentumDtype)

WeightDtype = Literal["fp32", "bf16"]
"""Storage dtype of the FC7 master weight (bf16: updated in fp32, stored with stochastic rounding)."""
WEIGHT_DTYPES: tuple[str, ...] = get_args(WeightDtype)

OptimizerName = Literal["sgd", "adamw"]
"""The optimizer of backbone and FC7 (ShardSGD / ShardAdamW for a sharded FC7)."""
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)

ScheduleName = Literal["step", "polynomial"]
"""Learning-rate schedule: piecewise decay at milestones, or polynomial decay after warm-up."""
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)

MarginFallback = Literal["shifted", "none"]
"""Past theta_limit: the continuous shifted cosine, or plain cos(m1*theta + m2) (megaface.head.margin)."""
MARGIN_FALLBACKS: tuple[str, ...] = get_args(MarginFallback)

ModelInit = Literal["per_group", "arcface_torch"]
"""Convolution init: fan-in per group (megaface) or over the whole weight (arcface_torch)."""
MODEL_INITS: tuple[str, ...] = get_args(ModelInit)

CropMode = Literal["pad", "resize"]
"""data.augment.crop_mode: keep the crop in place and zero the rest (AdaFace), or resize it to the image."""
CROP_MODES: tuple[str, ...] = get_args(CropMode)

NonFiniteAction = Literal["stop", "rewind"]
"""After a non-finite loss or state in training: stop (exit 1, naming the last healthy checkpoint), or rewind to
the newest verified checkpoint in the same job, skip the data that diverged and lower the lr for a while."""
NONFINITE_ACTIONS: tuple[str, ...] = get_args(NonFiniteAction)
