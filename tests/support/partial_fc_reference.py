"""A single-process reference of the sharded FC7 head, shared by the head's tests."""

from __future__ import annotations

import torch
import torch._dynamo  # noqa: F401 - torch.optim.Optimizer() imports it (~6 s); once here, not in every fork
import torch.nn.functional as F
from torch import nn

from megaface.distributed import comm
from megaface.head.margin import CombinedMargin
from megaface.head.partial_fc import init_shard

B, DIN, D, S = 12, 8, 16, 64.0


MARGINS = [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2)]


RTOL = 1e-5


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _batch(num_classes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, DIN, generator=gen), torch.randint(0, num_classes, (B,), generator=gen)


def _backbone():
    torch.manual_seed(1)
    return nn.Linear(DIN, D)


def _reference(num_classes, margin, columns=None, seed=0, straight_through=False):
    """Full-logit single-process loss and gradients (backbone, embeddings, full weight)."""
    x, y = _batch(num_classes, seed)
    bb = _backbone()
    emb = bb(x)
    emb.retain_grad()
    w = init_shard(0, num_classes, D).requires_grad_(True)
    w_used = w if columns is None else w[columns]
    if columns is not None:  # Partial FC: the same CE over the sampled columns only
        y = torch.searchsorted(columns, y)
    cos = F.normalize(emb) @ F.normalize(w_used).t()
    cos_t = cos.gather(1, y[:, None]).squeeze(1)
    logits = cos.scatter(1, y[:, None], CombinedMargin(margin, straight_through)(cos_t)[:, None]) * S
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return {"loss": loss.detach(), "bb": bb.weight.grad, "emb": emb.grad, "w": w.grad}


def _local_step(state, head, seed=0, dtype=torch.float32):
    x, y = _batch(head.num_classes, seed)
    b = B // state.world_size
    bb = _backbone()
    emb = bb(x[state.rank * b:(state.rank + 1) * b]).to(dtype)
    emb.retain_grad()
    loss = head(emb, y[state.rank * b:(state.rank + 1) * b])
    loss.backward()
    bb_grad = comm.all_reduce_(bb.weight.grad.clone(), "avg")  # DeepSpeed's data-parallel average
    return {"loss": loss.detach(), "bb": bb_grad, "emb": emb.grad, "w": head.weight.grad,
            "class_start": head.class_start}
