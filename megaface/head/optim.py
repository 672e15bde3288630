"""ShardSGD (the FC7 shard's optimizer, sparse over Partial FC rows) and the per-rank shard files.

Sparse update (sparse=True, the seed's indexed-slices SGD): with Partial FC the head hands over
(index [k], grad [k, D]); the step gathers those k rows of weight and momentum, applies
    buf = momentum * buf + grad + weight_decay * w;  w = w - lr * buf
to them only and writes them back with index_copy_. No [num_local, D] gradient is allocated or read;
unsampled rows keep their weight AND momentum bit-for-bit (no decay, no momentum drift).
Dense update (sparse=False, InsightFace PyTorch's behaviour): the sampled gradient is scattered into a zero
[num_local, D] gradient and every row takes the step, so unsampled rows still decay and follow their momentum.
Both equal torch.optim.SGD(momentum, weight_decay, dampening=0, nesterov=False) on the rows they touch (up to
float rounding: the weight decay is added into the momentum in place instead of into a temporary); with
sample_rate=1.0 (dense gradient on the Parameter) the two modes are identical.

Momentum storage (momentum_dtype): "fp32" (default, 4 KB of weight + momentum per class at D=512) or "bf16"
(3 KB per class). With bf16 the update is still computed in fp32 - the momentum rows are widened, updated,
applied to the fp32 weight and rounded back to bf16 - in chunks of ROW_CHUNK rows, so no fp32 copy of the
whole shard's momentum is ever made. Only the stored momentum is rounded (to 8 significant bits, each step).

Master weight storage (the head's weight_dtype): with a bf16 weight the same chunked step widens the weight rows
to fp32, updates them and rounds the result back to bf16 stochastically (`megaface.head.rounding`: unbiased,
so updates far below the weight's ulp still move it on average). The random bits are a hash of (head seed,
`step_count`, global row, column): deterministic, independent of the world size, and a resume is bit-exact
because `step_count` travels in the shard file. The momentum is rounded to nearest as above.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from megaface.head.partial_fc import ROW_CHUNK, PartialFC
from megaface.head.rounding import stochastic_round_bf16

MOMENTUM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ShardOptimizer(torch.optim.Optimizer):
    """What both FC7 shard optimizers share: the one parameter (the shard's weight), the Partial FC protocol
    (the sampled rows' gradients, taken from the head's `row_grads` object), dense vs sparse dispatch.
    Subclasses implement `_update(index, grad)`: index None = a dense [num_local, D] gradient, else [k] rows."""

    def __init__(self, head: PartialFC, defaults: dict[str, Any]) -> None:
        super().__init__([head.weight], defaults)
        self.head = head
        self.row_grads = head.row_grads  # the sampled rows' gradients: this optimizer is their one consumer

    def grads(self) -> list[torch.Tensor]:
        """The live gradient tensors of the next step (dense weight.grad and/or sampled [k, D] grads)."""
        out = self.row_grads.grads()
        if self.head.weight.grad is not None:
            out.append(self.head.weight.grad)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.row_grads.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weight = self.head.weight
        sampled = self.row_grads.take()
        if weight.grad is not None:  # all rows took part (sample_rate 1.0 or eval-mode forward)
            if sampled is not None:
                weight.grad.index_add_(0, sampled[0], sampled[1])
            self._update(None, weight.grad)
        elif sampled is not None and self.param_groups[0]["sparse"]:
            self._update(*sampled)
        elif sampled is not None:  # dense mode: every row takes the step (InsightFace PyTorch's behaviour)
            dense = torch.zeros_like(weight, dtype=torch.float32)  # fp32 whatever the weight's storage
            self._update(None, dense.index_copy_(0, sampled[0], sampled[1].float()))  # bf16 rows: widened
        return loss

    def _update(self, index: torch.Tensor | None, grad: torch.Tensor) -> None:
        raise NotImplementedError


class ShardSGD(ShardOptimizer):
    """SGD with momentum and weight decay for one PartialFC shard; `param_groups[0]["lr"]` is schedulable."""

    def __init__(self, head: PartialFC, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 sparse: bool = True, momentum_dtype: str = "fp32") -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not value >= 0.0:
                raise ValueError(f"ShardSGD {name}={value} must be >= 0")
        if momentum_dtype not in MOMENTUM_DTYPES:
            raise ValueError(f"ShardSGD momentum_dtype={momentum_dtype!r} must be one of {sorted(MOMENTUM_DTYPES)}")
        self.momentum_dtype = MOMENTUM_DTYPES[momentum_dtype]
        defaults = dict(lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay),
                        sparse=bool(sparse))
        super().__init__(head, defaults)
        # Steps applied so far: the counter of the bf16 weight's stochastic rounding (saved in the shard file).
        self.step_count = 0

    def _momentum_buffer(self) -> torch.Tensor | None:
        if self.param_groups[0]["momentum"] == 0:
            return None
        state = self.state[self.head.weight]
        if "momentum_buffer" not in state:
            # Zero start: momentum * 0 + d == d, bit-identical to torch.optim.SGD's first step.
            state["momentum_buffer"] = torch.zeros_like(self.head.weight, dtype=self.momentum_dtype)
        return state["momentum_buffer"]

    def _update(self, index: torch.Tensor | None, grad: torch.Tensor) -> None:
        """SGD on rows `index` (all rows when None) with grad [len(index) or num_local, D].

        With momentum the step is buf = momentum*buf + grad + wd*w; w -= lr*buf, accumulated into the
        momentum rows in place, so no weight-sized temporary is created (equal to torch.optim.SGD up to
        float rounding: torch forms grad + wd*w first).
        """
        group, weight = self.param_groups[0], self.head.weight
        lr, wd = group["lr"], group["weight_decay"]
        buf = self._momentum_buffer()
        self.step_count += 1
        if weight.dtype != torch.float32 or (buf is not None and buf.dtype != weight.dtype):
            self._update_chunked(index, grad, buf)
            return
        w_rows = weight if index is None else weight.index_select(0, index)
        if buf is None:
            d = grad.add(w_rows, alpha=wd) if wd else grad
        else:
            d = buf if index is None else buf.index_select(0, index)
            torch.add(grad, d, alpha=group["momentum"], out=d)  # one pass: d = grad + momentum * d
            if wd:
                d.add_(w_rows, alpha=wd)
            if index is not None:
                buf.index_copy_(0, index, d)
        w_rows.add_(d, alpha=-lr)
        if index is not None:
            weight.index_copy_(0, index, w_rows)

    def _update_chunked(self, index: torch.Tensor | None, grad: torch.Tensor, buf: torch.Tensor | None) -> None:
        """The same step with a low-precision momentum and/or weight: per chunk of rows, widen to fp32, update,
        round back (the momentum to nearest, a bf16 weight stochastically)."""
        group, weight = self.param_groups[0], self.head.weight
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        first_row = self.head.class_start * self.head.subcenters  # global index of local row 0
        for lo in range(0, grad.shape[0], ROW_CHUNK):
            hi = min(lo + ROW_CHUNK, grad.shape[0])
            rows = None if index is None else index[lo:hi]
            w_rows = weight[lo:hi] if rows is None else weight.index_select(0, rows)  # a view when dense
            w32 = w_rows.float()  # w_rows itself for an fp32 weight
            if buf is None:  # no momentum (only reached with a bf16 weight)
                d = grad[lo:hi].float().add(w32, alpha=wd) if wd else grad[lo:hi].float()
            else:
                d = (buf[lo:hi] if rows is None else buf.index_select(0, rows)).float()
                torch.add(grad[lo:hi], d, alpha=momentum, out=d)
                if wd:
                    d.add_(w32, alpha=wd)
            w32.add_(d, alpha=-lr)
            if buf is not None:
                if rows is None:
                    buf[lo:hi].copy_(d)
                else:
                    buf.index_copy_(0, rows, d.to(buf.dtype))
            if w32 is not w_rows:  # low-precision master: unbiased rounding, randomness keyed by the global row
                local = torch.arange(lo, hi, device=weight.device) if rows is None else rows
                w_rows = stochastic_round_bf16(w32, self.head.seed, self.step_count, local + first_row)
                if rows is None:
                    weight[lo:hi].copy_(w_rows)
            if rows is not None:
                weight.index_copy_(0, rows, w_rows)

    def momentum_buffer(self) -> torch.Tensor | None:
        """The dense momentum [num_local, D] (None before the first step or with momentum 0)."""
        return self.state[self.head.weight].get("momentum_buffer")

    def row_state(self) -> dict[str, torch.Tensor | None]:
        """The per-row optimizer state written to the shard files."""
        return {"momentum": self.momentum_buffer()}

    def load_row_state(self, rows: dict[str, Any], where: str) -> None:
        momentum, weight = rows.get("momentum"), self.head.weight
        if momentum is None:
            self.state[weight].pop("momentum_buffer", None)
            return
        if tuple(momentum.shape) != tuple(weight.shape):
            raise ValueError(f"{where}: momentum shape {tuple(momentum.shape)} != {tuple(weight.shape)}")
        # stored in the optimizer's momentum dtype (the current config wins over the file's dtype)
        self.state[weight]["momentum_buffer"] = momentum.to(device=weight.device, dtype=self.momentum_dtype,
                                                            copy=True)


# Per-row optimizer state a shard file may carry (leading dimension num_local; row_step is [num_local] int64):
# ShardSGD's momentum, ShardAdamW's moments and per-row step counts. Absent / None when not used.
ROW_STATE_KEYS = ("momentum", "exp_avg", "exp_avg_sq", "row_step")
