"""FC7 head: model-parallel (column-sharded) classifier with Partial FC and the combined margin.

    from megaface.head import PartialFC, ShardSGD
    head = PartialFC(512, num_classes, margin=CombinedMargin("arcface"), scale=64.0, sample_rate=0.1)
    opt = ShardSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)   # or ShardAdamW(head, lr=1e-3, weight_decay=0.1)
    loss = head(embeddings_local, labels_local)   # mean over the GLOBAL batch, same on every rank

Modules:
    partial_fc.py  the head: shard rows, Partial FC sampling, margin, distributed softmax CE
    sharding.py    pure class-range math (no process group)
    adaface.py     AdaFace's quality-adaptive margin (norm statistics all-gathered, EMA buffers)
    margin.py      the margin protocol and the combined angular margin cos(m1*theta + m2) - m3
    row_grads.py   SampledRowGrads: the Partial FC rows' gradients from the head's forward to the optimizer
    softmax.py     distributed margin softmax cross-entropy as one autograd Function
    optim.py       ShardSGD, sparse over the sampled rows
    rounding.py    stochastic rounding fp32 -> bf16 keyed by (seed, step, row, column) for a bf16 master weight
    adamw.py       ShardAdamW, sparse over the sampled rows
"""

from megaface.head.adaface import AdaFaceMargin
from megaface.head.adamw import ShardAdamW
from megaface.head.margin import MARGIN_PRESETS, CombinedMargin, Margin, resolve_margin
from megaface.head.optim import ROW_STATE_KEYS, ShardSGD
from megaface.head.partial_fc import PartialFC, resolve_compute_dtype
from megaface.head.row_grads import SampledRowGrads
from megaface.head.sharding import class_range, class_ranges

__all__ = [
    "AdaFaceMargin", "MARGIN_PRESETS", "ROW_STATE_KEYS", "CombinedMargin", "Margin", "PartialFC", "SampledRowGrads", "ShardAdamW",
    "ShardSGD",
    "class_range", "class_ranges", "resolve_compute_dtype", "resolve_margin",
]
