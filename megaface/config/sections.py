"""The experiment config's sections: frozen dataclasses with a docstring per field (see `megaface.config.loader`
for loading, overrides and validation; `megaface.config.ranges` for the range of every number)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megaface import vocab
from megaface.data import synthetic
from megaface.data.augment import Augment


def _path(default: Any = None, doc: str = "") -> Any:
    """A field holding a filesystem path (resolved against the YAML file's directory)."""
    return field(default=default, metadata={"path": True, "doc": doc})


def _paths(doc: str = "") -> Any:
    return field(default_factory=list, metadata={"path": True, "doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    """The backbone."""

    network: str = "mobilefacenet"
    """Registry name for `megaface.models.build_model` (e.g. mobilefacenet, iresnet50, iresnet100)."""
    init_from: str | None = _path(None, "Backbone file (.pt/.safetensors: convert import-oneflow / import-mxnet / "
                                        "import-insightface / consolidate) or checkpoint directory whose weights "
                                        "training starts from (sha256 digests verified first).")
    embedding_size: int | None = None
    """Embedding width D; None = the network's default (128 for mobilefacenet, 512 for iresnet*)."""
    dropout: float | None = None
    """Dropout before the embedding FC (iresnet "E" head); None = the network's default."""
    drop_path_rate: float | None = None
    """vit_*: stochastic depth of the last block (0 at the first, linear between); None = the size's default."""
    mask_ratio: float | None = None
    """vit_*: fraction of the 144 patches dropped per sample in train mode (mask token); None = size default."""
    checkpointing: bool | None = None
    """vit_*: activation checkpointing per block (non-reentrant); None = the size's default (on for b/l/h)."""
    bn_eps: float | None = None
    """CNNs: every BatchNorm's eps; None = the network's own (2e-5 / 1e-3). 1e-5 continues an arcface_torch
    model exactly (convert import-arcface-torch / import-onnx / import-insightface say so)."""

    def build_options(self) -> dict[str, Any]:
        """The set build options as `build_model` keywords (a ViT option given to a CNN, or bn_eps to a ViT,
        is refused by build_model)."""
        names = ("drop_path_rate", "mask_ratio", "checkpointing", "bn_eps")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}
    channels_last: bool = True
    """Feed the training batch to the backbone in channels_last (NHWC) memory order; the weights stay NCHW
    (DeepSpeed's flat parameter buffers need them contiguous) and the results are the same up to float
    rounding. On CPU it cut MobileFaceNet forward + backward CPU time by ~22% and left IResNet-50 unchanged
    (benchmarks/README.md); false feeds NCHW."""
    compile: bool = False
    """torch.compile the backbone inside the DeepSpeed engine (ZeRO 0-2; checkpoints keep their keys). On CPU
    inductor writes C++ and needs a compiler (g++); the first steps pay the compilation."""
    init: vocab.ModelInit = "per_group"
    """Conv/linear init: per_group = He fan_out counted per group (the networks' own); arcface_torch = fan_out
    ignoring groups, as its kaiming_normal_ does (depthwise kernels ~sqrt(channels) times smaller, so behind
    BatchNorm they take ~channels times larger effective steps)."""


@dataclass(frozen=True)
class AdaFaceConfig:
    """AdaFace's quality-adaptive margin (head.margin = adaface; megaface.head.adaface)."""

    m: float = 0.4
    """Margin size: the target gets an angular margin -m*q and an additive one m + m*q, q in [-1, 1]."""
    h: float = 0.333
    """Concentration: q = clip(h * (norm - EMA mean) / (EMA std + 1e-3), -1, 1)."""
    t_alpha: float = 0.01
    """Momentum of the EMA of the global batch's norm mean and std (1 = this batch's only)."""


@dataclass(frozen=True)
class HeadConfig:
    """FC7: the classifier over all identities, with a combined margin and optional Partial FC."""

    margin: tuple[float, float, float] | vocab.AdaptiveMargin = (1.0, 0.5, 0.0)
    """Combined margin (m1, m2, m3): target logit cos(m1*theta + m2) - m3. ArcFace = (1, 0.5, 0). A preset name
    is accepted too: arcface, cosface, combined, sphereface (megaface.vocab.MARGIN_PRESETS); or adaface, the
    quality-adaptive margin set by head.adaface."""
    adaface: AdaFaceConfig = field(default_factory=AdaFaceConfig)
    """AdaFace's m, h, t_alpha (used when head.margin = adaface)."""
    scale: float = 64.0
    """Logit scale s."""
    sample_rate: float = 1.0
    """Partial FC: fraction of each rank's classes taking part per step (positives always kept); 1 = all."""
    num_sample: int | None = None
    """Partial FC by count, as the seed's --num_sample: classes taking part per step over all ranks (8568 for
    85,744 classes = rate 0.1); sets sample_rate = num_sample / num_classes. None = use sample_rate."""
    parallel: vocab.HeadParallel = "model"
    """"model": FC7 rows sharded over ranks, own optimizer; "data": replicated FC7 inside the DeepSpeed engine."""
    straight_through: bool = False
    """Margin gradient as InsightFace PyTorch (no-grad arccos) instead of the true derivative."""
    num_classes: int | None = None
    """Number of identities; None = taken from the training data. Set it to check the data against it."""
    lr_scale: float = 1.0
    """FC7 learning rate = this x the schedule's lr (model-parallel head only)."""
    compute_dtype: vocab.ComputeDtype = "auto"
    """Operand dtype of the head's three GEMMs: auto (the DeepSpeed JSON's precision), fp32, bf16 or fp16.
    Low precision keeps fp32 accumulation, fp32 softmax statistics / margin / loss and fp32 master weights."""
    momentum_dtype: vocab.MomentumDtype = "fp32"
    """FC7 momentum storage (model-parallel head): fp32, or bf16 to hold 3 KB instead of 4 KB per class
    (D=512), i.e. about 1.33x the classes per GB; the update itself is computed in fp32."""
    weight_dtype: vocab.WeightDtype = "fp32"
    """FC7 master weight storage (model-parallel head, optim.name=sgd): fp32, or bf16 to hold 1 KB instead of
    2 KB per class (D=512; with momentum_dtype=bf16 the state is 2 KB a class). The update is computed in fp32
    and rounded to bf16 stochastically (unbiased; its random bits are a hash of seed, step, row and column, so
    runs and resumes stay exact). Accuracy against fp32: docs/head_precision.md."""
    subcenters: int = 1
    """Sub-center ArcFace: K rows per class, the class cosine is the max over them and the margin applies to
    that max (noisy web data; the paper uses 3). Costs K x the FC7 memory and GEMM work of the sampled classes."""
    interclass_filtering_threshold: float = 0.0
    """Non-target cosines above this are treated as label noise and set to 0 before margin and scale (in the
    softmax as exp(0), no gradient), as arcface_torch does for its WebFace12M "conflict" runs; 0 disables it."""
    margin_fallback: vocab.MarginFallback = "shifted"
    """Target logit past m1*theta + m2 = pi: shifted (continuous, decreasing cosine) or none (plain cosine)."""
    init_std: float = 0.01
    """FC7 rows start as N(0, init_std) (InsightFace's 0.01). Only the rows' norm, hence their step size, depends
    on it; with few classes 0.1 learns faster early (quickstart.yaml, docs/learning.md)."""
    clip_grad_norm: float | None = None
    """Max global norm of the FC7 gradient (model-parallel head); None = the DeepSpeed JSON's
    gradient_clipping (which clips the backbone), 0 = no FC7 clipping."""


@dataclass(frozen=True)
class SyntheticConfig:
    """Built-in synthetic identities (data.source = synthetic)."""

    identities: int = synthetic.DEFAULT_IDENTITIES
    """Training identities."""
    images_per_identity: int = synthetic.DEFAULT_IMAGES_PER_IDENTITY
    """Images per training identity."""
    val_pairs: int = synthetic.DEFAULT_VAL_PAIRS
    """Verification pairs on held-out identities (written as a .bin next to the pack)."""
    seed: int = synthetic.DEFAULT_SEED
    """Generator seed (the same seed gives the same files)."""


@dataclass(frozen=True)
class DataConfig:
    """Training data."""

    source: vocab.DataSource = "synthetic"
    """One of synthetic, recordio, folder, ofrecord."""
    path: str | None = _path(None, "Pack directory (recordio: train.rec/.idx/property, or the shards.json of "
                                   "`megaface pack rec --shards K`; ofrecord: part-* files) or image folder root.")
    part_num: int | None = None
    """ofrecord: read part files 0 .. part_num-1 (the seed's --train_data_part_num); unset = all of them."""
    part_name_suffix_length: int | None = None
    """ofrecord: digits of the zero-padded part number (5 for part-00000); unset = read off the names."""
    cache_dir: str = _path("~/.cache/megaface/synthetic", "Where synthetic packs are written (once, cached).")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Synthetic data settings."""
    workers: int = 2
    """Decoding worker threads/processes per rank."""
    flip: bool = True
    """Random horizontal flip."""
    augment: Augment = field(default_factory=Augment)
    """Augmentations on the training device, each off by default (megaface.data.augment)."""
    normalize: vocab.NormalizeMode = "arcface_torch"
    """Pixel normalisation: arcface_torch = (x/255-0.5)/0.5, oneflow = (x-127.5)/128 (the seed's)."""
    seed: int = 0
    """Shuffle / flip seed."""
    skip_corrupt: bool = False
    """Skip images that fail to decode (each skip is logged with a running count) instead of stopping."""
    decode: vocab.DecodeMode = "cpu"
    """cpu: loader workers decode JPEGs (libjpeg-turbo) and send pixels; gpu: they send the compressed JPEGs and the
    training device decodes each batch with nvJPEG (torchvision, CUDA only; megaface.data.device_decode)."""
    prepare: vocab.PrepareMode = "device"
    """device: uint8 batches cross to the training device, which flips, augments and normalises them; host: the
    loader's process normalises to float32 (the former path: 4x the bytes cross; no augment, decode=cpu)."""
    strict_decode: bool = False
    """A JPEG that decodes only with libjpeg warnings (damaged entropy data, truncated: partly grey) is an
    error (or a skip with skip_corrupt) instead of a counted, logged warning."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (drives the DeepSpeed optimizer and the FC7 optimizer alike).

    This section is the single source of truth for the optimizer: a DeepSpeed JSON with an "optimizer"
    section is accepted only when that section agrees (type, lr, betas, eps, weight_decay, momentum); see
    `megaface.config.ds_json.check_optimizer_single_source`. Weight decay follows arcface_torch: one
    weight_decay for every parameter of the backbone and of FC7 (norms, biases, pos_embed included; its
    ViT's no_weight_decay() list is never consulted by its train_v2).
    """

    name: vocab.OptimizerName = "sgd"
    """sgd (momentum, coupled weight decay) or adamw (decoupled weight decay; arcface_torch's ViT recipes)."""
    lr: float = 0.1
    """Base learning rate (at a global batch of any size: scale it yourself)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """Weight decay of backbone and FC7: SGD adds wd*w to the gradient, AdamW multiplies w by 1 - lr*wd."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2): torch.optim.AdamW's defaults, which arcface_torch uses."""
    eps: float = 1e-8
    """AdamW epsilon (added to sqrt of the bias-corrected second moment)."""
    schedule: vocab.ScheduleName = "step"
    """step (warm-up then x gamma at milestones) or polynomial (arcface_torch's PolynomialLRWarmup)."""
    power: float = 1.0
    """polynomial: lr = lr0 * (1 - (i - warmup) / (total - warmup)) ** power; 1.0 is what arcface_torch's
    train_v2 runs (the scheduler's default), 2.0 its lr_scheduler demo."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many iterations."""
    warmup_epochs: float = 0.0
    """Alternative to warmup_steps, in epochs (arcface_torch: num_epoch // 10 for its polynomial runs)."""
    milestones: list[int] = field(default_factory=list)
    """Piecewise decay: lr *= gamma at each of these iterations."""
    milestone_epochs: list[float] = field(default_factory=list)
    """Alternative to milestones, in epochs (converted with the loader's iterations per epoch)."""
    gamma: float = 0.1
    """Decay factor at each milestone."""


@dataclass(frozen=True)
class TrainConfig:
    """Run length, output, checkpoints, logging, distributed settings."""

    ds_config: str | None = _path(None, "DeepSpeed JSON (micro batch, accumulation, precision, clipping, ZeRO).")
    output_dir: str = _path("output", "Run directory: checkpoints/, tensorboard/, best backbone files.")
    max_steps: int | None = None
    """Training length in iterations (optimizer steps); exclusive with epochs."""
    epochs: float | None = None
    """Training length in epochs over the training data; exclusive with max_steps."""
    save_every: int = 0
    """Checkpoint every N iterations (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints kept (older ones deleted after a successful save); 0 = keep all."""
    log_every: int = 10
    """Print the train line every N iterations."""
    throughput_window: int = 50
    """Iterations in the windowed average throughput."""
    tensorboard: bool = True
    """Write tensorboard scalars under OUTPUT/tensorboard (rank 0)."""
    progress: vocab.ProgressMode = "auto"
    """Progress bar: auto (only when stdout is a terminal), on, off."""
    seed: int = 0
    """Seed for weights and head sampling (data order has data.seed)."""
    resume: str | None = None
    """latest, auto, a checkpoint tag directory, or None. auto (for job scripts that requeue after a preemption):
    resume from OUTPUT/checkpoints/latest when there is one, start fresh otherwise."""
    save_every_minutes: float = 0.0
    """Also checkpoint when this many minutes of wall time passed since the last save (ranks agree); 0 = off."""
    on_nonfinite: vocab.NonFiniteAction = "stop"
    """A non-finite loss or state: stop (exit 1, naming the last healthy checkpoint) or rewind (reload the newest
    verified checkpoint in the same job on every rank, skip the data that diverged, scale the lr by
    rewind_lr_factor for rewind_cooldown_steps iterations; after max_rewinds rewinds it stops)."""
    rewind_lr_factor: float = 0.1
    """With on_nonfinite = rewind: the lr multiplier for the iterations after a rewind."""
    rewind_cooldown_steps: int = 100
    """With on_nonfinite = rewind: iterations after a rewind that run at the lowered lr."""
    max_rewinds: int = 3
    """With on_nonfinite = rewind: rewinds allowed in one job; the next divergence stops the run."""
    collective_timeout_s: float = 120.0
    """A collective waiting longer than this fails the job: a dead, hung or stopped rank ends the others
    (exit code 3); a rank whose store heartbeat stops for this long is named (pid, host) and ended. 120 s suits CPU jobs; on GPU clusters
    with slow first steps (NCCL setup, compilation) or long validation, raise it (e.g. 600-1800)."""
    threads: int = 0
    """torch intra-op threads per rank; 0 = leave torch's default."""


@dataclass(frozen=True)
class ValidationConfig:
    """Verification on .bin packs during training."""

    bins: list[str] = _paths("Verification packs: .bin files (lfw.bin, ...) or OFRecord directories "
                             "(part-* files of encoded + issame).")
    synthetic: bool = True
    """With data.source = synthetic, also validate on its held-out-identity .bin."""
    interval: int = 2000
    """Validate every N iterations (and at the end); 0 = never."""
    batch_size: int = 64
    """Embedding batch per rank."""
    save_best: bool = True
    """Save OUTPUT/best_<pack>.pt (backbone) whenever a pack's Accuracy-Flip improves."""


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. Sections mirror the YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
