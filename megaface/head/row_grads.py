"""The Partial FC sampled rows of one optimizer step and their gradients: the one object between head and optimizer.

With sample_rate < 1 a training forward copies the k sampled rows of the shard into a fresh leaf [k, D]; the
backward fills its `.grad`. `SampledRowGrads` is where those (index [k], leaf) pairs wait from the forward
that made them to the optimizer step that applies them:

| who                         | call           | what                                                          |
|-----------------------------|----------------|---------------------------------------------------------------|
| PartialFC.forward           | `record`       | one sampled training forward's (index, leaf); refuses a forward past `accumulation_steps` waiting |
| step_fc7 (unscale, clip)    | `grads()`      | the live [k, D] gradients, to scale in place                  |
| ShardOptimizer.step         | `take()`       | (index, grad) merged over the micro-batches, then empty       |
| ShardOptimizer.zero_grad    | `clear()`      | drop everything (a skipped fp16 step)                         |

The head creates it (`PartialFC.row_grads`); the shard optimizer (`megaface.head.optim.ShardOptimizer`) is
its only consumer. A generic torch optimizer over `head.parameters()` would never see these gradients, which
is why `record` raises instead of letting sampled forwards pile up unapplied.
"""

from __future__ import annotations

import torch


class SampledRowGrads:
    """Pending (index [k], leaf rows [k, D]) pairs of sampled forwards since the last FC7 step."""

    def __init__(self, embedding_size: int, accumulation_steps: int, grad_dtype: torch.dtype) -> None:
        if int(accumulation_steps) < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps} must be >= 1 (gradient_accumulation_steps)")
        self.embedding_size, self.accumulation_steps = int(embedding_size), int(accumulation_steps)
        self.grad_dtype = grad_dtype  # merged gradients are summed in this dtype (the head passes fp32)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def check_room(self) -> None:
        """Before a training forward: forwards never backpropagated are dropped; raise when
        `accumulation_steps` backpropagated ones already wait (nothing would ever apply them)."""
        self._pending = [p for p in self._pending if p[1].grad is not None]
        if len(self._pending) >= self.accumulation_steps:
            raise RuntimeError(
                f"PartialFC: {len(self._pending)} sampled forward(s) were backpropagated but no optimizer step "
                f"consumed their row gradients (accumulation_steps={self.accumulation_steps}): step FC7 with "
                "megaface.head.ShardSGD / ShardAdamW (they take head.row_grads), or raise accumulation_steps "
                "to your gradient accumulation")

    def record(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep a sampled forward's rows (a leaf requiring grad) until the optimizer takes them."""
        self._pending.append((index, rows))

    def grads(self) -> list[torch.Tensor]:
        """The live [k, D] gradients of the backpropagated pending rows (scaled / clipped in place)."""
        return [r.grad for _, r in self._pending if r.grad is not None]

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(index [k], grad [k, D]) since the last step, merged over accumulated micro-batches (summed in
        `grad_dtype`: bf16 row gradients are widened, not accumulated in bf16); None when no sampled forward
        was backpropagated. Empties the object."""
        pairs = [(i, r.grad) for i, r in self._pending if r.grad is not None]
        self._pending = []
        if not pairs:
            return None
        if len(pairs) == 1:
            return pairs[0]
        index, inverse = torch.unique(torch.cat([i for i, _ in pairs]), return_inverse=True)
        grad = torch.zeros((index.numel(), self.embedding_size), dtype=self.grad_dtype, device=pairs[0][1].device)
        return index, grad.index_add_(0, inverse, torch.cat([g for _, g in pairs]).to(grad.dtype))

    def clear(self) -> None:
        self._pending = []
