"""ShardAdamW: AdamW (decoupled weight decay, as torch.optim.AdamW) for one FC7 shard, sparse over Partial FC rows.

Per row r of the shard, with gradient g_r at the r-th row's n_r-th update (n_r = its own step count):
    w_r  = w_r * (1 - lr * weight_decay)                       (decoupled decay)
    m_r  = beta1 * m_r + (1 - beta1) * g_r
    v_r  = beta2 * v_r + (1 - beta2) * g_r ** 2
    w_r -= lr / (1 - beta1 ** n_r) * m_r / (sqrt(v_r) / sqrt(1 - beta2 ** n_r) + eps)
which is torch.optim.AdamW's update (amsgrad off, maximize off) written per row.

Sparse update (sparse=True): with Partial FC the head hands over (index [k], grad [k, D]) of the sampled rows
(`PartialFC.row_grads`, a `megaface.head.row_grads.SampledRowGrads`); only those k rows of weight, exp_avg and exp_avg_sq are gathered, updated
and written back, and only their step counts advance. Unsampled rows keep weight, moments and step count
bit-for-bit: no weight decay, no moment decay, no drift along an old momentum. No [num_local, D] gradient is
allocated.

Bias correction uses each row's OWN step count n_r (saved per row as `row_step`), not the global step: a
row's moments are exponential averages over exactly the n_r updates it received, so 1 - beta ** n_r is the
weight those averages carry and dividing by it un-biases them exactly. With the global step t instead, a row
sampled for the first time late in training (1 - beta ** t ~ 1) would take the step lr * m / sqrt(v) =
lr * (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr per element, where every row's first step at the start of
training is lr; with per-row counts every row's first update has that intended size.

Dense update (sparse=False, arcface_torch's behaviour: its FC weight is one Parameter under
torch.optim.AdamW): the sampled gradient is scattered into a zero [num_local, D] gradient and every row takes
the step, so unsampled rows decay, their moments decay and they keep moving along their first moment. With
sample_rate 1.0 (dense gradient on the Parameter) both modes equal torch.optim.AdamW on the shard.
"""
from __future__ import annotations

from typing import Any

import torch

from megaface.head.optim import ShardOptimizer
from megaface.head.partial_fc import PartialFC

_ROW_KEYS = ("exp_avg", "exp_avg_sq", "row_step")


class ShardAdamW(ShardOptimizer):
    """AdamW for one PartialFC shard; `param_groups[0]["lr"]` is schedulable (set it before each step)."""

    def __init__(self, head: PartialFC, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, sparse: bool = True) -> None:
        if not lr >= 0.0 or not weight_decay >= 0.0 or not eps > 0.0:
            raise ValueError(f"ShardAdamW lr={lr}, weight_decay={weight_decay} must be >= 0 and eps={eps} > 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"ShardAdamW betas={betas} must be two values in [0, 1)")
        if head.weight.dtype != torch.float32:
            raise ValueError(f"ShardAdamW needs an fp32 FC7 weight, the head's is {head.weight.dtype}: build the head "
                             "with weight_dtype='fp32' (a bf16 master weight is supported by ShardSGD)")
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=float(weight_decay), sparse=bool(sparse))
        super().__init__(head, defaults)

    def _state(self) -> dict[str, torch.Tensor]:
        state = self.state[self.head.weight]
        if "exp_avg" not in state:
            weight = self.head.weight
            state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            state["row_step"] = torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device)
        return state

    def _update(self, index: torch.Tensor | None, grad: torch.Tensor) -> None:
        """AdamW on rows `index` (all rows when None) with grad [len(index) or num_local, D]."""
        group, weight, state = self.param_groups[0], self.head.weight, self._state()
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grad = grad.to(weight.dtype)  # bf16 sampled-row gradients (head.compute_dtype bf16) widen to fp32
        rows = slice(None) if index is None else index
        w = weight if index is None else weight.index_select(0, index)
        m = state["exp_avg"] if index is None else state["exp_avg"].index_select(0, index)
        v = state["exp_avg_sq"] if index is None else state["exp_avg_sq"].index_select(0, index)
        steps = state["row_step"][rows] + 1
        state["row_step"][rows] = steps
        w.mul_(1.0 - lr * wd)
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        # Per-row bias corrections [k, 1], in float64 so a long-trained row's 1 - beta ** n stays exact.
        n = steps.to(torch.float64).unsqueeze(1)
        step_size = (lr / (1.0 - beta1 ** n)).to(w.dtype)
        denom = (v.sqrt() / (1.0 - beta2 ** n).sqrt().to(w.dtype)).add_(eps)
        w.addcdiv_(m * step_size, denom, value=-1.0)
        if index is not None:
            weight.index_copy_(0, index, w)
            state["exp_avg"].index_copy_(0, index, m)
            state["exp_avg_sq"].index_copy_(0, index, v)

    # ---- the per-row state of the FC7 shard files (megaface.checkpoint.fc7_shards.shard_state_dict) ----------------------

    def row_state(self) -> dict[str, torch.Tensor | None]:
        """exp_avg / exp_avg_sq [num_local, D] and row_step [num_local] int64 (None before the first step)."""
        state = self.state[self.head.weight]
        return {key: state.get(key) for key in _ROW_KEYS}

    def load_row_state(self, rows: dict[str, Any], where: str) -> None:
        """Restore `row_state()` values (all three or none); `where` names the file in errors."""
        present = [key for key in _ROW_KEYS if rows.get(key) is not None]
        state = self.state[self.head.weight]
        if not present:
            for key in _ROW_KEYS:
                state.pop(key, None)
            return
        if len(present) != len(_ROW_KEYS):
            raise ValueError(f"{where}: AdamW state has {present} but needs all of {list(_ROW_KEYS)}; the shard "
                             "is damaged or was written by another tool")
        weight = self.head.weight
        for key in _ROW_KEYS:
            value = rows[key]
            shape = tuple(weight.shape) if key != "row_step" else (weight.shape[0],)
            if tuple(value.shape) != shape:
                raise ValueError(f"{where}: AdamW {key} has shape {tuple(value.shape)}, expected {shape}")
            dtype = torch.int64 if key == "row_step" else weight.dtype
            state[key] = value.to(device=weight.device, dtype=dtype, copy=True)
