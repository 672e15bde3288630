"""The FC7 head: column-sharded classifier + Partial FC sampling + combined margin + distributed softmax CE.

Data path of `PartialFC(...)(embeddings_local, labels_local)` with parallel="model" (W ranks, b local rows):

| step                                   | shape                       | collective                       |
|----------------------------------------|-----------------------------|----------------------------------|
| embeddings_local -> fp32, unit norm     | [b, D]                      | -                                |
| gradient scale x W (see below)          | [b, D]                      | -                                |
| all-gather embeddings / labels          | [B, D] / [B], B = W*b       | all-gather (backward: reduce-scatter sum) |
| select rows: positives + negatives      | index [k], rows [k, D]      | -                                |
| margin softmax CE over all columns      | [B] per-sample loss         | all-reduce max, all-reduce (sum-exp, target) |
| mean over the global batch              | scalar, same on every rank  | -                                |

Gradient algebra (the only place the world size enters a gradient)
    The returned loss L is the mean over the GLOBAL batch. The reduce-scatter in the all-gather's backward sums
    every rank's column contributions, so rank r receives exactly dL/d(embeddings_local_r). Its backbone
    replica then yields J_r^T dL/d(emb_r), and the true gradient of L w.r.t. the (replicated) backbone is the
    SUM over ranks of these terms. DeepSpeed, however, AVERAGES backbone gradients over the W data-parallel
    ranks. `_DataParallelGradScale` therefore multiplies the gradient reaching embeddings_local by W, so that
    after DeepSpeed's average the backbone holds exactly dL/d(backbone) of the global-batch mean loss.
    FC7 shard gradients are not scaled: every rank saw the whole global batch, so they are the complete
    dL/dW_shard and no averaging is applied to them (the shard lives outside the DeepSpeed engine).
    parallel="data" needs no scale: the loss is the local-batch mean and DeepSpeed's average of the W local
    gradients (equal local batches) is the global-mean gradient, for the backbone and the replicated FC7 alike.

Partial FC (sample_rate < 1, training mode)
    Rank r keeps every class of its shard that occurs in the global batch (positives) and fills with
    uniformly drawn negatives up to k = max(ceil(sample_rate * num_local), #positives) rows. The rows are
    copied into a fresh leaf tensor [k, D]: forward and backward touch only them and the gradient is [k, D].
    `ShardSGD` then updates only those rows (sparse=True) or, for the dense behaviour, all rows. The draw uses a
    torch.Generator seeded from (seed, rank); its state is part of the shard file (`megaface.checkpoint.fc7_shards`), so a resume is exact.
    At sample_rate 1.0 (or in eval mode) the Parameter itself is used and gets an ordinary dense gradient.
    Host syncs: the sampler's `unique` of the positives sizes k (an implicit sync on a GPU, once per step);
    labels are range-checked by the data loader per record and here only by a device-side assert (no read).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaface.distributed import comm
from megaface.head.margin import CombinedMargin, Margin
from megaface.head.row_grads import SampledRowGrads
from megaface.head.sharding import class_range
from megaface.head.softmax import COMPUTE_DTYPES, sharded_margin_cross_entropy
from megaface.utils.ranges import Range, check_range

INIT_STD = 0.01
# The one rule for the head's scale and sub-centers (config key -> range), checked by the config and here.
HEAD_RANGES: dict[str, Range] = {
    "head.subcenters": (1, 64, False, False),  # sub-center ArcFace's K rows per class; 1 = plain
    "head.scale": (0.0, math.inf, True, True),  # s multiplies every logit (64 is usual)
}
INIT_BLOCK = 4096  # rows drawn per seeded block: the initial weight does not depend on the world size
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _DataParallelGradScale(torch.autograd.Function):
    """Identity forward; backward multiplies by W so DeepSpeed's 1/W average restores the exact gradient.

    x [b, D] -> x [b, D]; grad [b, D] -> W * grad (see "Gradient algebra" in the module docstring).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def init_shard(class_start: int, num_local: int, embedding_size: int, seed: int = 0,
               std: float = INIT_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, std) rows [class_start, class_start + num_local), drawn in seeded blocks of class ids (fp32) and
    stored in `dtype` block by block (rounded to nearest), so no fp32 copy of a low-precision shard is made."""
    out = torch.empty((num_local, embedding_size), dtype=dtype)
    end = class_start + num_local
    gen = torch.Generator()
    for block in range(class_start // INIT_BLOCK, (end - 1) // INIT_BLOCK + 1):
        lo, hi = block * INIT_BLOCK, (block + 1) * INIT_BLOCK
        gen.manual_seed(seed * 1_000_003 + block)
        values = torch.randn((INIT_BLOCK, embedding_size), generator=gen).mul_(std)
        a, b = max(lo, class_start), min(hi, end)
        out[a - class_start:b - class_start] = values[a - lo:b - lo]
    return out


class PartialFC(nn.Module):
    """Column-sharded FC7 with combined margin and Partial FC; returns the GLOBAL-batch mean loss.

    Args:
        embedding_size, num_classes: D and C (C >= world size in model-parallel mode).
        margin: the target-logit margin object: `megaface.head.margin.CombinedMargin` (its gradient mode and
            fallback are its own settings) or `megaface.head.adaface.AdaFaceMargin`; an (m1, m2, m3) triple
            or a preset name of `megaface.head.margin.MARGIN_PRESETS` is shorthand for CombinedMargin(margin).
        scale: s, applied to every logit.
        sample_rate: Partial FC rate in (0, 1]; 1.0 = every row of the shard takes part.
        group: process group of the classifier (None = default group, or no group at all).
        parallel: "model" - rank r of `group` holds classes [class_start, class_start + num_local);
            "data" - the full weight on every rank, local-batch loss, no collectives (goes inside the
            DeepSpeed engine with the backbone).
        init_std: std of the N(0, std) initial rows. The rows are normalised in the forward, so only the
            direction counts, but the norm sets the rows' effective step size (an update of size lr*g turns
            a row by about lr*g/||w||): a smaller std makes FC7 learn faster at first.
        seed: initial weights (drawn per block of class ids: the same full matrix at any world size) and
            the Partial FC sampler (seeded from (seed, rank)).
        compute_dtype: "fp32", "bf16" or "fp16": operand dtype of the three GEMMs (fp32 accumulation).
            Row max, sum-exp, target logit, margin, loss and the weight itself stay fp32; the rows taking
            part are copied to the compute dtype once per step. Resolve "auto" with `resolve_compute_dtype`.
        subcenters: K rows per class (sub-center ArcFace): the class cosine is the max over its K rows and
            the margin applies to that max; a rank holds all K rows of each of its classes and Partial FC
            samples classes (all K rows of a sampled class). 1 = one row per class.
        interclass_filtering_threshold: > 0 treats every non-target cosine above it as label noise: set to
            0 before margin and scale (it stays in the softmax as exp(0), with no gradient); 0 disables it.
        accumulation_steps: training forwards allowed between two optimizer steps (gradient accumulation).
        weight_dtype: "fp32" or "bf16": storage of the shard's master weight (the Parameter). bf16 halves it
            (1 KB a row at D=512); `ShardSGD` then updates it in fp32 per chunk and rounds stochastically
            (megaface.head.rounding). The initial rows are the fp32 draw rounded to nearest.

    The optimizer contract (Partial FC, sample_rate < 1): the sampled rows are detached copies whose
    gradients wait in `head.row_grads` (`megaface.head.row_grads.SampledRowGrads`) until the shard optimizer
    takes them at its step (`megaface.head.ShardSGD` and `ShardAdamW` do; they also write the rows back). A
    generic torch optimizer over `head.parameters()` would see no gradient at all, so a training forward
    raises when more than `accumulation_steps` backpropagated sampled forwards are waiting: nothing ever
    trains FC7 silently without an update.
    Data-parallel gradient factor: a "data" head returns its rank's local-batch mean loss and relies on
    DeepSpeed's gradient averaging over ranks for the global-batch mean (the engine holds it).

    All ranks must pass the same local batch size (the embeddings are all-gathered in equal pieces).
    """

    def __init__(self, embedding_size: int, num_classes: int,
                 margin: Margin | str | tuple[float, float, float] = (1.0, 0.5, 0.0), scale: float = 64.0,
                 sample_rate: float = 1.0, group: dist.ProcessGroup | None = None, parallel: str = "model",
                 seed: int = 0, compute_dtype: str = "fp32", interclass_filtering_threshold: float = 0.0,
                 accumulation_steps: int = 1, init_std: float = INIT_STD, subcenters: int = 1,
                 weight_dtype: str = "fp32") -> None:
        super().__init__()
        _check_config(embedding_size, num_classes, scale, sample_rate, parallel)
        _check_precision(compute_dtype, interclass_filtering_threshold)
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype={weight_dtype!r} must be one of {sorted(WEIGHT_DTYPES)}")
        if weight_dtype != "fp32" and parallel != "model":
            raise ValueError(f"weight_dtype={weight_dtype!r} needs parallel='model' (a data-parallel FC7 is "
                             "updated by the DeepSpeed engine's optimizer); use weight_dtype='fp32'")
        self.compute_dtype = compute_dtype
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.scale, self.sample_rate, self.parallel = float(scale), float(sample_rate), parallel
        self.group, self.seed = group, int(seed)
        self.rank, self.world_size = comm.rank(group), comm.world_size(group)
        if parallel == "model":
            self.class_start, self.num_local = class_range(num_classes, self.world_size, self.rank)
        else:
            self.class_start, self.num_local = 0, self.num_classes
        self.margin = margin if isinstance(margin, Margin) else CombinedMargin(margin)
        if not (math.isfinite(float(init_std)) and float(init_std) > 0):
            raise ValueError(f"init_std={init_std} must be a positive finite number (0.01 is usual)")
        if not isinstance(subcenters, int):
            raise ValueError(f"subcenters={subcenters!r} must be an integer (1 = plain ArcFace; the paper uses 3)")
        check_range("subcenters", subcenters, HEAD_RANGES["head.subcenters"], "1 = plain ArcFace; the paper uses 3")
        self.subcenters = subcenters
        # K rows per class, class c's at rows c*K .. c*K + K - 1: drawn as "row classes" c*K + j, so the full
        # [C*K, D] matrix is the same at any world size and a rank's rows are one contiguous slice of it.
        self.weight = nn.Parameter(init_shard(self.class_start * subcenters, self.num_local * subcenters,
                                              self.embedding_size, seed, float(init_std),
                                              WEIGHT_DTYPES[weight_dtype]))
        self.sampled_index: torch.Tensor | None = None  # rows of the last forward (None: all rows)
        self._generator: torch.Generator | None = None
        # merged micro-batch gradients are summed in fp32 whatever the weight's storage dtype
        self.row_grads = SampledRowGrads(self.embedding_size, accumulation_steps, torch.float32)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"class_start={self.class_start}, num_local={self.num_local}, margin={self.margin}, "
                f"scale={self.scale}, sample_rate={self.sample_rate}, parallel={self.parallel!r}, "
                f"compute_dtype={self.compute_dtype!r}, weight_dtype={self.weight.dtype}, "
                f"subcenters={self.subcenters}, "
                f"interclass_filtering_threshold={self.interclass_filtering_threshold}")

    # ---- forward ------------------------------------------------------------------------------------

    def forward(self, embeddings_local: torch.Tensor, labels_local: torch.Tensor) -> torch.Tensor:
        """embeddings_local [b, D] (any float dtype), labels_local [b] int -> scalar loss (fp32)."""
        _check_inputs(embeddings_local, labels_local, self.embedding_size)
        emb = F.normalize(embeddings_local.float(), dim=1)  # the head always computes in fp32
        labels = labels_local.detach().to(device=emb.device, dtype=torch.long)  # never modified in place
        distributed = self.parallel == "model" and self.world_size > 1
        if distributed:
            emb = _DataParallelGradScale.apply(emb, float(self.world_size))
            emb = comm.all_gather(emb, self.group)
            labels = comm.all_gather(labels, self.group)
        _check_labels(labels, self.num_classes)
        index, weight_rows = self._select_rows(labels)
        target = self._local_targets(labels, index)
        gather = (lambda x: comm.all_gather(x, self.group)) if self.world_size > 1 else None  # also "data"
        margin = self.margin.for_batch(embeddings_local, gather, self.training)
        per_sample = sharded_margin_cross_entropy(emb, weight_rows, target, margin, self.scale,
                                                  self.group, reduce=distributed,
                                                  compute_dtype=COMPUTE_DTYPES[self.compute_dtype],
                                                  filter_threshold=self.interclass_filtering_threshold,
                                                  subcenters=self.subcenters)
        return per_sample.mean()

    def _select_rows(self, labels_global: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(class index [k] sorted or None, rows [k*K, D]): positives of this shard plus random negatives;
        with K sub-centers a sampled class brings all its K rows (`sampled_index` holds the row index)."""
        if self.training:
            self.row_grads.check_room()
        self.sampled_index = None
        if self.sample_rate >= 1.0 or not self.training:
            return None, self.weight
        local = labels_global - self.class_start
        positives = torch.unique(local[(local >= 0) & (local < self.num_local)])
        k = max(math.ceil(self.sample_rate * self.num_local - 1e-9), positives.numel())
        if k >= self.num_local:
            return None, self.weight
        scores = torch.rand(self.num_local, generator=self._rng(), device=self.weight.device)
        scores[positives] = 2.0  # above every uniform draw: positives are always kept
        index = torch.topk(scores, k, sorted=False).indices.sort().values
        row_index = index if self.subcenters == 1 else _subcenter_rows(index, self.subcenters)
        rows = _gather_rows(self.weight.detach(), row_index, self._row_dtype())
        if torch.is_grad_enabled() and self.weight.requires_grad:
            rows.requires_grad_(True)
            self.row_grads.record(row_index, rows)
        self.sampled_index = row_index
        return index, rows

    def _row_dtype(self) -> torch.dtype:
        """Dtype of the sampled rows' copy and of their gradient. bf16 compute keeps them in bf16 (they are
        only the GEMM operand, which is bf16 anyway, and a gradient the fp32 master update widens again):
        3 KB less per sampled row than an fp32 copy + fp32 gradient + bf16 operand, i.e. 300 bytes per class
        at rate 0.1. fp16 keeps fp32: its gradients carry the loss scale and would overflow fp16. fp32 compute
        keeps fp32 (also over a bf16 master weight: the rows are widened exactly)."""
        return torch.bfloat16 if self.compute_dtype == "bf16" else torch.float32

    def _local_targets(self, labels_global: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """[B]: the column of each label among this rank's (selected) rows, -1 where it lives elsewhere."""
        local = labels_global - self.class_start
        here = (local >= 0) & (local < self.num_local)
        if index is not None:
            local = torch.searchsorted(index, local.clamp(0, self.num_local - 1))
        return torch.where(here, local, torch.full_like(local, -1))

    # ---- sampler state (the shard files) -------------------------------------------------------------

    def _rng(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.weight.device:
            self._generator = torch.Generator(device=self.weight.device)
            self._generator.manual_seed(2**48 + self.seed * 1009 + self.rank)
        return self._generator

    def sampler_state(self) -> torch.Tensor:
        """The Partial FC generator state (uint8 tensor on CPU) for exact resume."""
        return self._rng().get_state().cpu()

    def set_sampler_state(self, state: torch.Tensor | None) -> None:
        """Restore a `sampler_state()`; None re-seeds from (seed, rank)."""
        self._generator = None
        if state is not None:
            self._rng().set_state(state.cpu())  # generator states are CPU byte tensors on every device


# Rows per chunk wherever FC7 rows change dtype on the way (the bf16 gather here, ShardSGD's bf16-momentum
# update): an 8 MiB fp32 temporary at D=512, a fixed cost whatever the class count.
ROW_CHUNK = 1 << 12


def _subcenter_rows(classes: torch.Tensor, subcenters: int) -> torch.Tensor:
    """Local class indices [k] -> their rows [k*K] (c*K .. c*K + K - 1 per class, in class order)."""
    offsets = torch.arange(subcenters, device=classes.device, dtype=classes.dtype)
    return (classes.unsqueeze(1) * subcenters + offsets).reshape(-1)


def _gather_rows(weight: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight[index] as a new [k, D] tensor of `dtype`; a change of dtype goes through chunk-sized
    temporaries, so no [k, D] copy in the weight's dtype is ever made."""
    if dtype == weight.dtype:
        return weight.index_select(0, index)
    out = torch.empty((index.numel(), weight.shape[1]), dtype=dtype, device=weight.device)
    for lo in range(0, index.numel(), ROW_CHUNK):
        out[lo:lo + ROW_CHUNK] = weight.index_select(0, index[lo:lo + ROW_CHUNK])
    return out


def resolve_compute_dtype(compute_dtype: str, precision: str) -> str:
    """head.compute_dtype -> "fp32" | "bf16" | "fp16"; "auto" takes the DeepSpeed JSON's `precision`."""
    if compute_dtype != "auto":
        return compute_dtype
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"head.compute_dtype=auto but the DeepSpeed precision is {precision!r}, not one of "
                         f"{sorted(COMPUTE_DTYPES)}; set head.compute_dtype explicitly")
    return precision


# ---- validation (user errors -> ValueError naming the value and the constraint) ------------------------

def _check_precision(compute_dtype: str, threshold: float) -> None:
    if compute_dtype not in COMPUTE_DTYPES:
        hint = " (resolve 'auto' with resolve_compute_dtype first)" if compute_dtype == "auto" else ""
        raise ValueError(f"compute_dtype={compute_dtype!r} must be one of {sorted(COMPUTE_DTYPES)}{hint}")
    if not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) < 1.0):
        raise ValueError(f"interclass_filtering_threshold={threshold} must lie in [0, 1) (a cosine; 0 = off)")


def _check_config(embedding_size: int, num_classes: int, scale: float, sample_rate: float, parallel: str) -> None:
    if parallel not in ("model", "data"):
        raise ValueError(f"parallel={parallel!r} must be 'model' (sharded FC7) or 'data' (replicated FC7)")
    if int(embedding_size) < 1:
        raise ValueError(f"embedding_size={embedding_size} must be >= 1")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    if not (isinstance(sample_rate, (int, float)) and 0.0 < float(sample_rate) <= 1.0):
        raise ValueError(f"sample_rate={sample_rate} must lie in (0, 1] (1.0 = no Partial FC sampling)")
    # Partial FC with a data-parallel head is refused where users set it, at config load
    # (`megaface.config.loader.validate`); reaching here with both is a caller's bug, not a user's.
    assert parallel == "model" or float(sample_rate) == 1.0, \
        f"sample_rate={sample_rate} with parallel='data': validate the config before building the head"
    check_range("scale", float(scale), HEAD_RANGES["head.scale"], "64 is usual")


def _check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, embedding_size: int) -> None:
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ValueError(f"embeddings must be a 2-D tensor [batch, {embedding_size}], got "
                         f"{getattr(embeddings, 'shape', type(embeddings))}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings dtype={embeddings.dtype} is not a floating type; pass float32, "
                         "float16 or bfloat16 embeddings")
    if embeddings.shape[1] != embedding_size:
        raise ValueError(f"embeddings width {embeddings.shape[1]} != embedding_size={embedding_size} "
                         "of the head; build the head with the backbone's embedding size")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings batch is empty; every rank needs at least one sample per step")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be a 1-D tensor of {embeddings.shape[0]} class ids, got "
                         f"{getattr(labels, 'shape', type(labels))}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels dtype={labels.dtype} is not an integer type; pass int64 class ids")


def _check_labels(labels_global: torch.Tensor, num_classes: int) -> None:
    # The data path range-checks every record's label where it is read (megaface.data.loader), so this is a
    # guard for direct library use only, and it must not read the device: `_assert_async` raises at once on
    # CPU and is a device-side assert on accelerators (no host sync; the run stops at the next sync point).
    # Checked on the GLOBAL labels, so every rank fails alike rather than one leaving the others in a collective.
    inside = (labels_global.min() >= 0) & (labels_global.max() < num_classes)
    torch._assert_async(inside, f"a label is outside [0, num_classes={num_classes}); check the dataset's class "
                                "count against the head's num_classes")
