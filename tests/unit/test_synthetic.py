"""Synthetic identities: determinism, caching/atomic writing, and "learnable but not trivial"."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megaface.data import TrainLoader, decode_image, load_bin, normalize_batch, open_pack
from megaface.data.synthetic import (
    _VAL_STREAM,
    HELD_OUT_BASE,
    SyntheticDataset,
    ensure_synthetic,
    generate,
    verification_pairs,
)

try:
    from megaface.eval.verification import evaluate

    def accuracy(emb, emb_flip, issame):
        return evaluate(emb, emb_flip, np.asarray(issame))["accuracy"]
except ImportError:  # stand-in until the eval package exists: best single threshold over all pairs
    def accuracy(emb, emb_flip, issame):
        e = emb + (emb_flip if emb_flip is not None else 0)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        d = ((e[0::2] - e[1::2]) ** 2).sum(1)
        same = np.asarray(issame)
        return max(((d < t) == same).mean() for t in np.arange(0, 4, 0.01))


def test_deterministic_and_batch_independent():
    ids, idx = [3, 3, 8, 1], [0, 1, 0, 5]
    batch = generate(ids, idx, seed=11)
    assert batch.shape == (4, 112, 112, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch, generate(ids, idx, seed=11, chunk=3))
    assert np.array_equal(batch[2], generate([8], [0], seed=11)[0])  # any image regenerates alone
    assert not np.array_equal(batch, generate(ids, idx, seed=12))
    ds = SyntheticDataset(10, 6, seed=11)
    assert ds[3 * 6 + 1][0] == 3 and np.array_equal(ds[3 * 6 + 1][1], batch[1])
    assert generate([0], [0], size=40).shape == (1, 40, 40, 3)


def test_generation_rate_reported(capsys):
    start = time.perf_counter()
    generate(np.arange(64) // 4, np.arange(64) % 4, seed=0)
    rate = 64 / (time.perf_counter() - start)
    print(f"synthetic generation: {rate:.0f} images/s (112x112, one process)")
    assert rate > 5  # a sanity floor only; the machine may be heavily shared


def test_verification_pairs_layout():
    table, issame = verification_pairs(100, seed=3)
    assert table.shape == (200, 2) and issame.sum() == 50
    a, b = table[0::2, 0], table[1::2, 0]
    assert np.array_equal(a == b, issame) and (table[:, 0] >= HELD_OUT_BASE).all()
    assert len(set(table[:, 1].tolist())) == 200  # each image has its own nuisance
    for fold in np.array_split(issame, 10):
        assert 0 < fold.sum() < len(fold)


def test_ensure_synthetic_cached_and_atomic(tmp_path):
    pack_dir, bin_path = ensure_synthetic(tmp_path, 5, 3, val_pairs=8, seed=2)
    pack = open_pack(pack_dir)
    assert len(pack) == 15 and pack.num_classes == 5 and pack.image_size == (112, 112)
    ds = SyntheticDataset(5, 3, seed=2)
    for i in (0, 7, 14):
        label, data = pack[i]
        assert label == ds[i][0]
        # JPEG q95 of the same image
        assert np.abs(decode_image(data).astype(int) - ds[i][1].astype(int)).mean() < 6
    images, issame = load_bin(bin_path)
    assert len(images) == 16 and sum(issame) == 4
    mtime = (pack_dir / "train.rec").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, 5, 3, val_pairs=8, seed=2) == (pack_dir, bin_path)
    assert (pack_dir / "train.rec").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [pack_dir.name]
    with pytest.raises(ValueError, match="identities=1"):
        ensure_synthetic(tmp_path, 1, 3)


class SmallNet(nn.Module):
    """Four stride-2 convs + a linear embedding: keeps the spatial layout, which is where identity lives."""

    def __init__(self, num_classes: int, res: int, dim: int = 64):
        super().__init__()
        layers, ch = [], [3, 16, 32, 64, 96]
        for a, b in zip(ch, ch[1:], strict=False):
            layers += [nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        side = (res + 15) // 16
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(96 * side * side, dim), nn.BatchNorm1d(dim))
        self.fc = nn.Linear(dim, num_classes)
        self.res = res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.res:
            x = F.adaptive_avg_pool2d(x, self.res)
        return self.embed(self.features(x))


def _verify(net: SmallNet, images: torch.Tensor, issame) -> float:
    net.eval()
    with torch.no_grad():
        acc = accuracy(net(images).numpy(), net(images.flip(3)).numpy(), issame)
    net.train()
    return acc


def _train(net: SmallNet, batches, steps: int) -> None:
    """Normalised-softmax classification (cosine logits x 16), SGD + one-cycle LR."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=steps)
    for _, (x, y) in zip(range(steps), batches, strict=False):
        loss = F.cross_entropy(net.fc(F.normalize(net(x))) * 16, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.fixture(scope="module")
def small_data():
    """100 training identities x 10 images + 300 held-out pairs, drawn directly at 32x32 (fast variant)."""
    ids, k, pairs = 100, 10, 300
    labels = np.repeat(np.arange(ids), k)
    train = generate(labels, np.tile(np.arange(k), ids), seed=0, size=32)
    table, issame = verification_pairs(pairs, seed=0)
    val = generate(table[:, 0], table[:, 1], seed=0, stream=_VAL_STREAM, size=32)
    return train, labels, val, issame


def test_learnable_fast(small_data):
    """Reduced variant for the default run: 32x32, ~20 s of training; the full one is the slow test."""
    torch.set_num_threads(1)
    train, labels, val, issame = small_data
    x, y, v = normalize_batch(train), torch.from_numpy(labels), normalize_batch(val)
    torch.manual_seed(0)  # initial weights: the before/after numbers are reproducible
    net = SmallNet(100, 32)
    before = _verify(net, v, issame)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            perm = torch.randperm(len(x), generator=g)
            for b in range(len(x) // 64):
                i = perm[b * 64:(b + 1) * 64]
                flip = torch.rand(len(i), generator=g) < 0.5
                yield torch.where(flip[:, None, None, None], x[i].flip(3), x[i]), y[i]

    _train(net, batches(), steps=12 * (len(x) // 64))
    after = _verify(net, v, issame)
    print(f"fast learnability: before {before:.3f} after {after:.3f}")
    assert before < 0.7 and after >= 0.75


def test_mean_colour_is_near_chance(small_data):
    """A model that only sees the per-channel mean colour, trained on the same identities, stays near 50%."""
    train, labels, val, issame = small_data
    feats = torch.tensor(train.reshape(len(train), -1, 3).mean(1) / 255 - 0.5, dtype=torch.float32)
    vfeats = torch.tensor(val.reshape(len(val), -1, 3).mean(1) / 255 - 0.5, dtype=torch.float32)
    raw = accuracy(vfeats.numpy(), None, issame)
    torch.manual_seed(0)
    mlp, fc = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 32)), nn.Linear(32, 100)
    opt = torch.optim.Adam([*mlp.parameters(), *fc.parameters()], 1e-2)
    y = torch.from_numpy(labels)
    for _ in range(200):
        loss = F.cross_entropy(fc(mlp(feats)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = accuracy(mlp(vfeats).numpy(), None, issame)
    print(f"mean-colour verification: raw {raw:.3f}, trained MLP {trained:.3f}")
    assert raw < 0.65 and trained < 0.65


@pytest.mark.slow
def test_learnable_full_pipeline(tmp_path):
    """The real path: ensure_synthetic -> RecordIO -> TrainLoader (JPEG decode, flips) -> .bin -> protocol."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    pack_dir, bin_path = ensure_synthetic(tmp_path, 300, 12, val_pairs=1000, seed=0)
    made = time.perf_counter() - start
    pack = open_pack(pack_dir)
    images, issame = load_bin(bin_path)
    v = normalize_batch(np.stack([decode_image(b) for b in images]))
    torch.manual_seed(0)
    net = SmallNet(pack.num_classes, 56)
    before = _verify(net, v, issame)
    loader = TrainLoader(pack, 64, seed=0, workers=1)

    def batches():
        while True:
            yield from loader

    _train(net, batches(), steps=10 * len(loader))
    after = _verify(net, v, issame)
    print(f"full learnability: before {before:.3f} after {after:.3f}; data {made:.0f}s, "
          f"total {time.perf_counter() - start:.0f}s")
    assert before < 0.7 and after >= 0.9
