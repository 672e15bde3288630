"""Every collective megaface uses, in three layers (raw op / autograd Function / public wrapper).

All public wrappers take an explicit `group` (None = the default group) and are no-ops when the job has a
single rank or no process group at all, so the same code path serves world size 1.

| wrapper            | forward                          | backward                         | shapes                        |
|--------------------|----------------------------------|----------------------------------|-------------------------------|
| all_gather         | all-gather along dim 0           | reduce-scatter (sum)             | x_local [b, ...] -> [W*b, ...] |
| all_reduce_max     | all-reduce (max), no grad        | -                                | x [...] -> [...]              |
| all_reduce_        | in-place all-reduce, no grad     | -                                | x [...] -> [...]              |
| gather_rows        | uneven all-gather, no grad       | -                                | x_local [n_r, ...] -> [sum n_r, ...] |
| broadcast_buffers  | rank src's buffers, in place     | -                                | module buffers                |
| all_reduce_max_async | all-reduce (max) posted, read later | -                             | x [...] (CPU) -> [...]        |

The distributed softmax (megaface.head.softmax) reduces its statistics with `all_reduce_` inside its own
autograd Function, whose backward is written out there with the gradient algebra.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


def world_size(group: dist.ProcessGroup | None = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


# torch >= 2.10 renamed the *_into_tensor / *_tensor collectives to *_single; accept both.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _supports_reduce_scatter(group: dist.ProcessGroup | None) -> bool:
    # gloo has no reduce_scatter; all-reduce + narrow gives the same numbers at W times the traffic.
    return dist.get_backend(group) != "gloo"


# ---- raw collectives (no autograd) ------------------------------------------------------------------

def _all_gather_raw(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    w = world_size(group)
    if w == 1:
        return x
    x = x.contiguous()
    out = torch.empty((w * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_raw(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    w = world_size(group)
    if w == 1:
        return x
    x = x.contiguous()
    rows = x.shape[0] // w
    if _supports_reduce_scatter(group):
        out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        _reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group)
        return out
    summed = x.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return summed.narrow(0, rank(group) * rows, rows).clone()


def _all_reduce_raw(x: torch.Tensor, op: Any, group: dist.ProcessGroup | None) -> torch.Tensor:
    if world_size(group) == 1:
        return x
    out = x.clone().contiguous()
    dist.all_reduce(out, op=op, group=group)
    return out


# ---- autograd Functions -----------------------------------------------------------------------------

class _AllGather(torch.autograd.Function):
    """x_local [b, ...] -> x_global [W*b, ...]; backward: reduce-scatter (sum) of the global gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _all_gather_raw(x, group)

    @staticmethod
    def backward(ctx: Any, grad_global: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter_raw(grad_global, ctx.group), None


# ---- public wrappers --------------------------------------------------------------------------------

def all_gather(x_local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate equal-sized local batches of all ranks in rank order; gradients reduce-scatter back."""
    return _AllGather.apply(x_local, group)


@torch.no_grad()
def all_reduce_max(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Element-wise max over ranks, outside autograd (used for the softmax shift)."""
    return _all_reduce_raw(x.detach(), dist.ReduceOp.MAX, group)


@torch.no_grad()
def all_reduce_(x: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce outside autograd; op in {'sum', 'max', 'min', 'avg'} ('avg' = sum / W)."""
    w = world_size(group)
    if w == 1:
        return x
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "avg": dist.ReduceOp.SUM}
    if op not in ops:
        raise ValueError(f"all_reduce_: op={op!r} is not one of {sorted(ops)}")
    dist.all_reduce(x, op=ops[op], group=group)
    if op == "avg":
        x.div_(w)
    return x


@torch.no_grad()
def gather_rows(x_local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather tensors whose first dimension differs per rank; result in rank order on every rank."""
    w = world_size(group)
    if w == 1:
        return x_local
    count = torch.tensor([x_local.shape[0]], dtype=torch.long, device=x_local.device)
    counts = _all_gather_raw(count, group).tolist()  # one sync: sizes are needed to pad
    longest = max(counts)
    padded = x_local.new_zeros((longest, *x_local.shape[1:]))
    padded[: x_local.shape[0]] = x_local
    gathered = _all_gather_raw(padded, group).view(w, longest, *x_local.shape[1:])
    return torch.cat([gathered[r, : counts[r]] for r in range(w)])


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank `src`'s Python object on every rank."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's Python object, in rank order, on every rank."""
    w = world_size(group)
    if w == 1:
        return [obj]
    out: list[Any] = [None] * w
    dist.all_gather_object(out, obj, group=group)
    return out


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite every rank's buffers (BatchNorm running statistics) with rank `src`'s, in place."""
    if world_size(group) == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src, group=group)


def cpu_group(group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """A group of the same ranks for small CPU tensors: `group` itself on gloo, else a new gloo group.
    Collective when it creates one (every rank of the job calls it, in the same order)."""
    if world_size(group) == 1 or dist.get_backend(group) == "gloo":
        return group
    ranks = dist.get_process_group_ranks(group) if group is not None else None
    return dist.new_group(ranks=ranks, backend="gloo")


@torch.no_grad()
def all_reduce_max_async(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> Callable[[], torch.Tensor]:
    """Post an element-wise max over ranks of CPU tensor `x` (group from `cpu_group`) without waiting; the
    returned function waits and gives the result. Posting at one step and reading at the next costs the
    step nothing; every rank must post the same number of them, in the same order."""
    if world_size(group) == 1:
        return lambda: x
    out = x.clone()
    work = dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group, async_op=True)

    def result() -> torch.Tensor:
        work.wait()
        return out

    return result


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if world_size(group) > 1:
        dist.barrier(group=group)
