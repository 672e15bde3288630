"""TrainLoader: sharding, determinism, exact resume, flips, normalisation, decode errors, image folders."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from megaface.data import CorruptImageError, TrainLoader, build_dataset, encode_jpeg, normalize_batch
from megaface.data.packs import PackWriter


class IndexImages:
    """Tiny 8x8 images that carry their own index (row 0) and a left-side marker (to see flips)."""

    def __init__(self, n: int, num_classes: int = 7):
        self.n, self.num_classes = n, num_classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = np.zeros((8, 8, 3), dtype=np.uint8)
        img[0, :, 0], img[0, :, 1] = i % 256, i // 256
        img[1, 0] = 255
        return i % self.num_classes, img


def decode_batch(images: torch.Tensor) -> tuple[list[int], list[bool]]:
    x = images.round().to(torch.int64)
    idx = (x[:, 0, 0, 0] + 256 * x[:, 1, 0, 0]).tolist()
    flipped = (x[:, 0, 1, 7] == 255).tolist()
    return idx, flipped


def run(loader, limit=None):
    out = []
    # islice takes exactly `limit` batches: the loader counts a batch as consumed once it has been yielded
    for images, labels in itertools.islice(loader, limit):
        idx, flips = decode_batch(images)
        assert labels.tolist() == [i % 7 for i in idx] and labels.dtype == torch.int64
        out.append((idx, flips))
    return out


def make(ds, batch, rank=0, world=1, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("normalize", "none")
    return TrainLoader(ds, batch, rank, world, **kw)


@pytest.mark.parametrize("world, drop_last", [(1, True), (3, True), (3, False), (2, False)])
def test_each_sample_once_per_epoch(world, drop_last):
    ds = IndexImages(50)
    loaders = [make(ds, 4, r, world, seed=5, drop_last=drop_last) for r in range(world)]
    per_rank = [run(loader) for loader in loaders]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(loaders[0])
    seen = [i for p in per_rank for idx, _ in p for i in idx]
    assert len(seen) == len(set(seen))
    assert len(seen) == (50 // (4 * world)) * 4 * world if drop_last else sorted(seen) == list(range(50))
    if not drop_last:  # the short last global batch is split as evenly as possible
        sizes = sorted(len(p[-1][0]) for p in per_rank)
        assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 50 - (len(loaders[0]) - 1) * 4 * world


def test_global_batch_is_the_union_of_rank_slices():
    ds = IndexImages(48)
    single = run(make(ds, 12, seed=1))
    ranks = [run(make(ds, 4, r, 3, seed=1)) for r in range(3)]
    for g in range(len(single)):
        assert single[g][0] == sum((ranks[r][g][0] for r in range(3)), [])
        assert single[g][1] == sum((ranks[r][g][1] for r in range(3)), [])  # flips independent of world size


def test_shuffle_deterministic_and_changes_with_epoch():
    ds = IndexImages(40)
    a, b = make(ds, 8, seed=3), make(ds, 8, seed=3)
    e0a, e0b = run(a), run(b)
    assert e0a == e0b and a.epoch == 1
    e1 = run(a)
    assert e1 != e0a and sorted(i for x, _ in e1 for i in x) == list(range(40))
    assert run(make(ds, 8, seed=4)) != e0a
    flips = [f for _, fs in e0a for f in fs]
    assert 0 < sum(flips) < len(flips)
    assert not any(f for _, fs in run(make(ds, 8, seed=3, flip=False)) for f in fs)


@pytest.mark.parametrize("stop_after", [0, 2, 5])
def test_exact_resume(stop_after):
    ds = IndexImages(44)
    reference = make(ds, 4, 1, 2, seed=9)
    full = run(reference) + run(reference)  # two epochs (5 batches each)
    first = make(ds, 4, 1, 2, seed=9)
    head = run(first, limit=stop_after)
    state = first.state_dict()
    resumed = make(ds, 4, 1, 2, seed=9)
    resumed.load_state_dict(state)
    tail = run(resumed)
    if len(head) + len(tail) < len(full):
        tail += run(resumed)
    assert head + tail == full


def test_resume_state_after_full_epoch_moves_to_next():
    ds = IndexImages(16)
    loader = make(ds, 4, seed=2)
    first_epoch = run(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    other = make(ds, 4, seed=2)
    other.load_state_dict(loader.state_dict())
    assert run(other) == run(loader) != first_epoch


def test_resume_mismatch_errors():
    state = make(IndexImages(16), 4, seed=2).state_dict()
    with pytest.raises(ValueError, match="same data and seed"):
        make(IndexImages(17), 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        make(IndexImages(5), 4, 0, 2)
    with pytest.raises(ValueError, match="rank < world_size"):
        make(IndexImages(50), 4, 2, 2)


def test_normalize_modes():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    a = normalize_batch(x, "arcface_torch")
    ref = ((torch.from_numpy(x).float() / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)
    assert a.shape == (1, 3, 16, 16) and a.dtype == torch.float32 and torch.equal(a, ref)
    assert a.min() == -1 and a.max() == 1
    o = normalize_batch(torch.from_numpy(x), "oneflow")
    assert torch.equal(o, ((torch.from_numpy(x).float() - 127.5) / 128).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="unknown normalize mode 'imagenet'"):
        normalize_batch(x, "imagenet")


def _jpeg_pack(path, n_classes=4, per_class=6, corrupt=()):
    rng = np.random.default_rng(0)
    with PackWriter(path) as w:
        k = 0
        for c in range(n_classes):
            for _ in range(per_class):
                img = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
                data = encode_jpeg(img)
                w.add(c, data[: len(data) // 8] if k in corrupt else data)
                k += 1
    return path


def test_workers_match_inline_and_recordio(tmp_path):
    ds = build_dataset("recordio", _jpeg_pack(tmp_path / "p"))
    inline = list(TrainLoader(ds, 4, 0, 2, seed=1, workers=0))
    pooled = list(TrainLoader(ds, 4, 0, 2, seed=1, workers=2))
    assert len(inline) == len(pooled) == 3
    for (xa, ya), (xb, yb) in zip(inline, pooled, strict=False):
        assert xa.shape == (4, 3, 112, 112) and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_corrupt_jpeg_error_and_skip(tmp_path):
    ds = build_dataset("recordio", _jpeg_pack(tmp_path / "p", corrupt=(5,)))
    with pytest.raises(CorruptImageError, match=r"train\.rec: key 6 at offset \d+: cannot decode.*skip_corrupt"):
        list(TrainLoader(ds, 8, seed=0, workers=0))
    logs = []
    loader = TrainLoader(ds, 8, seed=0, workers=0, skip_corrupt=True, log=logs.append)
    batches = list(loader)
    assert len(batches) == 3 and all(x.shape[0] == 8 for x, _ in batches)
    assert loader.skipped == 1 and "key 6" in loader.skipped_where[0] and "skipped 1 corrupt" in logs[0]


def test_image_folder_dataset(tmp_path):
    rng = np.random.default_rng(1)
    for name, count in [("bob", 2), ("alice", 3)]:
        (tmp_path / "faces" / name).mkdir(parents=True)
        for j in range(count):
            img = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
            (tmp_path / "faces" / name / f"{j}.jpg").write_bytes(encode_jpeg(img))
    ds = build_dataset("folder", tmp_path / "faces")
    assert ds.identities == ["alice", "bob"] and ds.num_classes == 2 and len(ds) == 5
    assert sorted(ds.labels().tolist()) == [0, 0, 0, 1, 1]
    (x, y), = list(TrainLoader(ds, 5, workers=0))
    assert x.shape == (5, 3, 112, 112) and sorted(y.tolist()) == [0, 0, 0, 1, 1]
    (tmp_path / "faces" / "carol").mkdir()
    with pytest.raises(ValueError, match=r"faces/carol: identity folder holds no images"):
        build_dataset("folder", tmp_path / "faces")
    with pytest.raises(ValueError, match="unknown dataset source 'lmdb'"):
        build_dataset("lmdb", tmp_path)
    with pytest.raises(ValueError, match="unknown option.*identites.*valid options: identities"):
        build_dataset("synthetic", None, identites=3)


def test_synthetic_on_the_fly_dataset():
    ds = build_dataset("synthetic", None, identities=3, images_per_identity=2, seed=4)
    assert len(ds) == 6 and ds.num_classes == 3
    label, img = ds[5]
    assert label == 2 and img.shape == (112, 112, 3) and img.dtype == np.uint8
    (x, y), = list(TrainLoader(ds, 6, workers=0))
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]


def test_synthetic_dataset_materialised(tmp_path):
    pack = build_dataset("synthetic", tmp_path, identities=3, images_per_identity=2, seed=4, val_pairs=4)
    assert len(pack) == 6 and pack.num_classes == 3 and (pack.directory / "val.bin").is_file()
    assert pack.labels().tolist() == [0, 0, 1, 1, 2, 2]


def test_persistent_workers_resume_mid_epoch_and_next_epoch():
    ds = IndexImages(40)
    reference = make(ds, 4, 0, 2, seed=6)
    full = run(reference) + run(reference)
    loader = make(ds, 4, 0, 2, seed=6, workers=2)
    head = run(loader, limit=2)  # abandon the epoch's iterator mid-way
    assert head + run(loader) + run(loader) == full
    loader.close()


def test_decoders_agree_and_reject_truncated():
    import cv2

    import megaface.data.decode as dec

    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), (0, 0), 2)
    data = encode_jpeg(img)
    chosen = dec.decode_image(data)
    reference = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert chosen.shape == (112, 112, 3) and np.array_equal(chosen, reference)  # bit-identical pixels
    assert np.abs(chosen.astype(int) - img).mean() < 3  # RGB order kept through encode/decode
    png = cv2.imencode(".png", img[:, :, ::-1])[1].tobytes()
    assert np.array_equal(dec.decode_image(png), img)
    gray = cv2.imencode(".jpg", img[:, :, 0])[1].tobytes()
    assert dec.decode_image(gray).shape == (112, 112, 3)
    for cut in (len(data) // 2, len(data) - 8):
        with pytest.raises(CorruptImageError, match="cannot decode"):
            dec.decode_image(data[:cut])
    with pytest.raises(CorruptImageError, match="empty"):
        dec.decode_image(b"")


def test_a_label_outside_the_class_count_is_named_where_it_is_read():
    """Labels are range-checked once per record on the host (the head keeps no per-step host read)."""

    class BadLabel(IndexImages):
        def __getitem__(self, i: int):
            label, img = super().__getitem__(i)
            return (7 if i == 3 else label), img

    with pytest.raises(ValueError, match=r"BadLabel item 3: label 7 is outside \[0, 7\)"):
        list(TrainLoader(BadLabel(8), 4, workers=0))
