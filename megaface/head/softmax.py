"""Distributed margin softmax cross-entropy over column-sharded FC7 logits, as one autograd Function.

Shapes (B = global batch, D = embedding width, k = rows of this rank's shard taking part, after sampling):

| tensor            | shape  | where                                                              |
|-------------------|--------|--------------------------------------------------------------------|
| emb_hat_global    | [B, D] | unit-norm embeddings of the whole global batch (same on all ranks) |
| weight_rows       | [k, D] | this rank's FC7 rows (normalised inside: only their norms are kept)|
| target_local      | [B]    | column of each sample's class in weight_rows, -1 when not here     |
| returns           | [B]    | per-sample cross-entropy, identical on every rank                  |

Only three [B]-sized reductions cross ranks (max, then sum-exp and target logit in one all-reduce); the logit
matrix exists only as this rank's [B, k] columns. They are the single large buffer, kept as column blocks
of [B, c]: a block holds the logits, then exp(logit - max), and in backward becomes in place the gradient of
the raw dot products, feeding both backward GEMMs while it is still in cache. A step thus costs the three
GEMMs (logits, d/d emb, d/d weight) plus about two memory passes over the buffer. On CPU a block is ~2 MB
(cache-sized); on accelerators the columns form one block (no per-block launches).

Precision (compute_dtype): the three GEMMs take fp32, bf16 or fp16 operands (fp32 accumulation); the
low-precision copies of emb_hat_global and weight_rows are made once per step. The [B, c] block buffer, the
row max, sum-exp, target cosine, margin and loss are fp32 in every mode. The embedding gradient is fp32; the
weight gradient has weight_rows' dtype (PartialFC hands bf16 rows under bf16 compute: their gradient is
formed and projected in fp32 per block and rounded once). With compute_dtype fp32 every operation is the
fp32 head's, bit for bit.

Inter-class filtering (filter_threshold > 0): a non-target logit whose cosine exceeds the threshold is set to
0 in its block before the row max (so it stays in the softmax as exp(0 - max)) and its gradient is zeroed in
backward. The filter is elementwise on this rank's columns, so the sharded result is exact with the same two
all-reduces; the filtered positions (rare) are kept per block instead of a [B, c] mask.

Host syncs (a device value the host must wait for; none of them is an `.item()`): `nonzero` of the targets
present on this rank (it sizes the target tensors), and with inter-class filtering one `nonzero` per block of
the filtered positions. The block bounds need no read on accelerators (one block); on CPU, several blocks,
they are read from a CPU tensor, which is no sync.

The gradient returned for emb_hat_global is this rank's partial sum over its own columns; the all-gather's
backward (reduce-scatter, sum) completes it. The gradient for weight_rows is complete: every rank sees the
whole global batch. Backward may run once per forward (the buffer is consumed in place).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megaface.distributed import comm
from megaface.head.margin import Margin

NORM_EPS = 1e-12  # same floor as torch.nn.functional.normalize
CPU_BLOCK_ELEMENTS = 1 << 19  # 2 MiB of fp32 per [B, c] block on CPU
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The [B, c] block buffer stays fp32 in every compute dtype: the GEMM output is converted per block (while in
# cache), so max / exp / sum-exp and the softmax-minus-one-hot gradient are exact fp32 (p - 1 for a confident
# target loses every digit in bf16). Measured (benchmarks/head.py --block-dtype-probe, B=256, c=2048) on the
# 2-core Xeon (AVX-512F, no AVX512-BF16), two runs on the shared machine: the bf16 buffer took 1.01x and 0.90x
# the fp32 buffer's time (noise-level; bf16 elementwise kernels convert to fp32 inside), and this work is small
# next to the GEMMs, so fp32 is kept for its accuracy. On accelerators, where the shard is
# one block, a bf16 buffer would halve its memory; not measured (no GPU), see docs/head_precision.md.
BLOCK_DTYPE = torch.float32


def _block_columns(batch: int, k: int, device: torch.device) -> int:
    if device.type != "cpu":
        return max(k, 1)
    return max(256, CPU_BLOCK_ELEMENTS // max(batch, 1))


class _ShardedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, emb_hat: torch.Tensor, weight_rows: torch.Tensor, target_local: torch.Tensor,
                margin: Margin, scale: float, group: dist.ProcessGroup | None, reduce: bool,
                compute_dtype: torch.dtype, filter_threshold: float, subcenters: int) -> torch.Tensor:
        K = subcenters  # noqa: N806 - the paper's K
        batch, k = emb_hat.shape[0], weight_rows.shape[0] // K  # k classes of K rows each
        inv_norm = torch.linalg.vector_norm(weight_rows, dim=1, dtype=torch.float32)  # [k], fp32 for bf16 rows
        inv_norm = inv_norm.clamp_min_(NORM_EPS).reciprocal_()
        col_scale = inv_norm * scale
        # Targets sorted by column, so each block's targets are one slice; their cosines come from a
        # [B, D] row gather (cheap, always fp32), so the margined logits are known before the blocks are built.
        rows = (target_local >= 0).nonzero().squeeze(1)
        cols, order = target_local.index_select(0, rows).sort()
        rows = rows.index_select(0, order)
        cos_t, sub_t = _target_cosines(emb_hat, weight_rows, inv_norm, rows, cols, K)
        target_logit = margin(cos_t, rows) * scale
        width = max(_block_columns(batch, k * K, emb_hat.device) // K, 1)  # classes per block
        starts = list(range(0, k, width))
        bounds = _block_bounds(cols, starts, k)
        # GEMM operands: the low-precision copies are made once per step (accumulation stays fp32).
        emb_op, weight_op = emb_hat.to(compute_dtype), weight_rows.to(compute_dtype)
        limit = filter_threshold * scale if filter_threshold > 0 else None

        blocks, filtered, winners, shift = [], [], [], None
        for i, c0 in enumerate(starts):
            c1 = min(c0 + width, k)
            block = torch.matmul(emb_op, weight_op[c0 * K:c1 * K].t()).to(BLOCK_DTYPE)  # [B, c*K]
            block.mul_(col_scale[c0 * K:c1 * K])
            if K > 1:  # a class's logit is its best sub-center's; backward routes the gradient to that row
                block, winner = block.view(batch, c1 - c0, K).max(dim=2)  # [B, c], [B, c]
                winners.append(winner)
            a, b = bounds[i], bounds[i + 1]
            if limit is not None:
                filtered.append(_filter_block(block, limit, rows[a:b], cols[a:b] - c0))
            block[rows[a:b], cols[a:b] - c0] = target_logit[a:b]
            block_max = block.amax(dim=1)
            shift = block_max if shift is None else torch.maximum(shift, block_max)
            blocks.append(block)
        assert shift is not None  # k >= 1 (every rank owns a class, head/sharding.py): the loop ran
        if reduce:
            shift = comm.all_reduce_max(shift, group)
        # sum-exp and the target logit (zero where the class lives elsewhere) travel in one all-reduce.
        stats = torch.zeros((2, batch), dtype=emb_hat.dtype, device=emb_hat.device)
        column = shift.unsqueeze(1)
        for block in blocks:
            stats[0] += block.sub_(column).exp_().sum(dim=1)
        stats[1].index_copy_(0, rows, target_logit - shift.index_select(0, rows))
        if reduce:
            comm.all_reduce_(stats, "sum", group)
        sum_exp, target_shifted = stats[0], stats[1]

        ctx.save_for_backward(emb_hat, weight_rows)
        ctx.operands = (emb_op, weight_op)
        ctx.blocks, ctx.filtered, ctx.starts, ctx.bounds, ctx.width = blocks, filtered, starts, bounds, width
        ctx.col_scale, ctx.inv_norm, ctx.sum_exp = col_scale, inv_norm, sum_exp
        ctx.rows, ctx.cols, ctx.cos_t, ctx.margin = rows, cols, cos_t, margin
        ctx.subcenters, ctx.winners, ctx.sub_t = K, winners, sub_t
        return sum_exp.log() - target_shifted

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        emb_hat, weight_rows = ctx.saved_tensors
        if ctx.blocks is None:
            raise RuntimeError("the FC7 softmax backward ran twice; it consumes its buffer (no retain_graph)")
        blocks, ctx.blocks = ctx.blocks, None
        emb_op, weight_op = ctx.operands
        rows, cols, bounds, K = ctx.rows, ctx.cols, ctx.bounds, ctx.subcenters  # noqa: N806
        k = weight_rows.shape[0] // K
        row_scale = (grad_loss / ctx.sum_exp).unsqueeze(1)  # softmax_ij * g_i = exp_ij * g_i / sum_i
        target_grad = grad_loss.index_select(0, rows)       # the one-hot part, g_i on the target column
        target_factor = ctx.margin.derivative(ctx.cos_t, rows)    # d margin / d cos on the target column
        want_emb, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_emb = torch.zeros_like(emb_hat) if want_emb else None
        grad_weight = torch.empty_like(weight_rows) if want_weight else None
        for i, c0 in enumerate(ctx.starts):
            c1 = min(c0 + ctx.width, k)
            block, blocks[i] = blocks[i], None  # release each block once used
            a, b = bounds[i], bounds[i + 1]
            r, c = rows[a:b], cols[a:b] - c0
            # d/d dot_ij = g_i (softmax_ij - onehot_ij) * s / ||w_j||  (target: times margin'(cos))
            block.mul_(row_scale)
            block[r, c] -= target_grad[a:b]
            if K == 1:
                block.mul_(ctx.col_scale[c0:c1])
            block[r, c] *= target_factor[a:b]
            if ctx.filtered:  # filtered logits are constants (0): no gradient reaches their dot products
                block.view(-1).index_fill_(0, ctx.filtered[i], 0.0)
            if K > 1:  # d/d class logit -> d/d dot of the winning sub-center row (the others get 0)
                block = _to_subcenter_rows(block, ctx.winners[i], r, c, ctx.sub_t[a:b], K)
                block.mul_(ctx.col_scale[c0 * K:c1 * K])
            r0, r1 = c0 * K, c1 * K  # this block's weight rows
            block_grad = None
            if grad_weight is not None:  # fp32 rows: in place; bf16 rows: formed and projected in fp32, rounded once
                block_grad = grad_weight[r0:r1] if grad_weight.dtype == torch.float32 else torch.empty(
                    (r1 - r0, weight_rows.shape[1]), dtype=torch.float32, device=block.device)
            _backward_gemms(block, emb_op, weight_op[r0:r1], grad_emb, block_grad)
            if block_grad is not None:
                _project_out_rows(block_grad, weight_rows[r0:r1].float(), ctx.inv_norm[r0:r1])
                if grad_weight is not None and grad_weight.dtype != torch.float32:
                    grad_weight[r0:r1].copy_(block_grad)
        return grad_emb, grad_weight, None, None, None, None, None, None, None, None


def _target_cosines(emb_hat: torch.Tensor, weight_rows: torch.Tensor, inv_norm: torch.Tensor, rows: torch.Tensor,
                    cols: torch.Tensor, subcenters: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cos of each target [n] (fp32, from a row gather) and, with K > 1 sub-centers, which of its class's K
    rows is the nearest [n] (the class cosine is their max)."""
    if subcenters == 1:
        cos_t = (emb_hat.index_select(0, rows) * weight_rows.index_select(0, cols).float()).sum(dim=1)
        return cos_t * inv_norm.index_select(0, cols), None
    dim = weight_rows.shape[1]
    w = weight_rows.view(-1, subcenters, dim).index_select(0, cols).float()  # [n, K, D]
    cos_all = (emb_hat.index_select(0, rows).unsqueeze(1) * w).sum(dim=2)  # [n, K]
    cos_all = cos_all * inv_norm.view(-1, subcenters).index_select(0, cols)
    return cos_all.max(dim=1)


def _to_subcenter_rows(grad: torch.Tensor, winner: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       sub_t: torch.Tensor, subcenters: int) -> torch.Tensor:
    """[B, c] gradient of the class logits -> [B, c*K] gradient of the sub-center logits: each class's
    gradient goes to its winning row (for targets the winner of the row-gather cosine the margin used)."""
    winner[rows, cols] = sub_t
    batch, c = grad.shape
    out = torch.zeros((batch, c, subcenters), dtype=grad.dtype, device=grad.device)
    out.scatter_(2, winner.unsqueeze(2), grad.unsqueeze(2))
    return out.view(batch, c * subcenters)


def _block_bounds(cols: torch.Tensor, starts: list[int], k: int) -> list[int]:
    """Where each block's targets begin in the sorted `cols` (and where the last ends), as host ints.

    One block (every accelerator, and CPU shards under one block): [0, n], n the target count that `nonzero`
    already brought to the host - no read. Several blocks (CPU only): a read of a CPU tensor, not a sync.
    """
    if len(starts) == 1:
        return [0, cols.shape[0]]
    return torch.searchsorted(cols, torch.tensor(starts + [k], device=cols.device)).tolist()


def _filter_block(block: torch.Tensor, limit: float, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Zero the non-target logits above `limit` (= threshold * s) in place; returns their flat positions.

    The target entries are excluded (they are overwritten with the margined logit right after). Positions
    are kept instead of a [B, c] mask: filtered entries are rare, and backward zeroes their gradient.
    """
    noisy = block > limit
    noisy[rows, cols] = False
    flat = noisy.view(-1).nonzero().squeeze(1)
    block.view(-1).index_fill_(0, flat, 0.0)
    return flat


def _backward_gemms(grad_block: torch.Tensor, emb_op: torch.Tensor, weight_op: torch.Tensor,
                    grad_emb: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    """grad_emb += G @ W_blk, grad_weight = G^T @ E (fp32 results; operands in the compute dtype)."""
    if emb_op.dtype == grad_block.dtype:  # fp32: accumulate in place, no temporaries
        if grad_emb is not None:
            grad_emb.addmm_(grad_block, weight_op)
        if grad_weight is not None:
            torch.mm(grad_block.t(), emb_op, out=grad_weight)
        return
    grad_op = grad_block.to(emb_op.dtype)
    if grad_emb is not None:
        grad_emb.add_(torch.mm(grad_op, weight_op))
    if grad_weight is not None:
        grad_weight.copy_(torch.mm(grad_op.t(), emb_op))


def _project_out_rows(grad: torch.Tensor, weight: torch.Tensor, inv_norm: torch.Tensor) -> None:
    """grad_j -= (grad_j . w_j) / ||w_j||^2 * w_j in place: the Jacobian of w -> w / ||w|| (per block, so
    both operands are still in cache; einsum/vecdot over the whole shard were 2-5x slower here)."""
    along = (grad * weight).sum(dim=1).mul_(inv_norm).mul_(inv_norm)
    grad.addcmul_(weight, along.unsqueeze(1), value=-1.0)


def sharded_margin_cross_entropy(emb_hat_global: torch.Tensor, weight_rows: torch.Tensor,
                                 target_local: torch.Tensor, margin: Margin, scale: float,
                                 group: dist.ProcessGroup | None = None, reduce: bool = True,
                                 compute_dtype: torch.dtype = torch.float32,
                                 filter_threshold: float = 0.0, subcenters: int = 1) -> torch.Tensor:
    """Per-sample margin softmax CE [B] over the columns of all ranks (see the module table).

    `reduce=False` treats this rank's rows as all the classes (the data-parallel head: no collectives).
    `compute_dtype` is the GEMM operand dtype (fp32 accumulation; everything else fp32).
    `filter_threshold` > 0 sets every non-target cosine above it to 0 before margin and scale.
    `subcenters` K > 1: weight_rows holds K rows per class (class c: rows c*K .. c*K + K - 1), target_local
    indexes classes, and a class's cosine is the max over its K rows (sub-center ArcFace).
    """
    return _ShardedMarginCE.apply(emb_hat_global, weight_rows, target_local, margin, scale, group, reduce,
                                  compute_dtype, float(filter_threshold), int(subcenters))
