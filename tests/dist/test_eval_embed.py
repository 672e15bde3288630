"""Embedding extraction and validation on world sizes 1, 2, 3 (uneven shares) against one process."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import torch

from megaface.distributed import DistState
from megaface.distributed.ds_shm import skip_shm_build
from megaface.eval.embed import embed_images, num_forward_batches, shard_range
from megaface.eval.validation import Validator
from tests.conftest import run_distributed


class TinyNet(torch.nn.Module):
    """Deterministic small model that counts its forward calls (what ZeRO-3 needs to be equal per rank)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4)
        self.bn = torch.nn.BatchNorm1d(4 * 28 * 28)
        self.fc = torch.nn.Linear(4 * 28 * 28, dim)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(self.bn(torch.relu(self.conv(x)).flatten(1)))


def _images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
        img[:, : 10 + 3 * (i % 30)] = 40 * (i % 5)  # asymmetric, so the flip matters
        out.append(cv2.imencode(".png", img)[1].tobytes())
    return out


def _embed_job(state: DistState, images: list, batch_size: int, flip: bool):
    model = TinyNet()
    model.train()
    emb, emb_flip = embed_images(model, images, state, batch_size=batch_size, flip=flip)
    return emb, emb_flip, model.calls, model.training


def test_shard_math():
    assert [shard_range(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_range(2, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    assert num_forward_batches(10, 3, 3) == 2 and num_forward_batches(2, 3, 64) == 1


@pytest.mark.parametrize("world,n,batch", [(2, 11, 4), (3, 11, 4), (3, 2, 4)])
def test_embed_matches_single_process(world, n, batch):
    images = _images(n)
    ref, ref_flip, _, _ = _embed_job(DistState(), images, batch, True)
    results = run_distributed(_embed_job, world, images, batch, True)
    expected_calls = 2 * num_forward_batches(n, world, batch)
    for emb, emb_flip, calls, training in results:
        np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(emb_flip, ref_flip, rtol=1e-5, atol=1e-5)
        assert calls == expected_calls  # every rank, even one with an empty share
        assert training  # mode restored
    assert not np.allclose(ref, ref_flip)


def test_embed_accepts_arrays_and_no_flip():
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    emb, emb_flip = embed_images(TinyNet(), arrays, DistState(), batch_size=2, flip=False)
    assert emb.shape == (3, 8) and emb.dtype == np.float32 and emb_flip is None
    x = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    model = TinyNet().eval()
    with torch.no_grad():
        np.testing.assert_allclose(emb, model(x).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="normalize"):
        embed_images(TinyNet(), arrays, DistState(), normalize="imagenet")
    for batch in (64, 2):  # within one batch, and across batches
        with pytest.raises(ValueError, match="shape"):
            embed_images(TinyNet(), arrays + [arrays[0][:100]], DistState(), batch_size=batch)


def _write_bin(path, pairs: int, odd: bool = False, flags: int | None = None) -> str:
    images = _images(2 * pairs + (1 if odd else 0), seed=7)
    issame = [i % 2 == 0 for i in range(pairs if flags is None else flags)]
    with open(path, "wb") as f:
        pickle.dump((images, issame), f)
    return str(path)


def _validate_job(state: DistState, paths: list[str]):
    lines: list[str] = []
    validator = Validator(paths, state, batch_size=4)
    model = TinyNet()
    first = validator.run(model, 10, log=lines.append)
    improved_first = list(validator.improved)
    validator.run(model, 20, log=lines.append)
    return lines, first, improved_first, list(validator.improved), dict(validator.best)


def test_validator_lines_and_best(tmp_path):
    paths = [_write_bin(tmp_path / "lfw.bin", 20), _write_bin(tmp_path / "agedb_30.bin", 11)]
    single = _validate_job(DistState(), paths)
    lines, first, improved_first, improved_second, best = single
    assert lines[:4][0] == "Validation on [lfw]:" and lines[1] == "Embedding shape: (40, 8)"
    assert lines[2].startswith("XNorm: ") and lines[3].startswith("Accuracy-Flip: ")
    assert lines[4] == "Validation on [agedb_30]:" and len(lines) == 16
    assert improved_first == ["lfw", "agedb_30"] and improved_second == []
    assert best == {k: v["accuracy"] for k, v in first.items()}
    results = run_distributed(_validate_job, 3, paths)
    assert results[0][0] == lines  # same printed numbers on 3 ranks
    assert results[1][0] == [] and results[1][4] == best  # only rank 0 logs; every rank knows the best


class _Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple] = []

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.append((tag, value, step))


def test_validator_writer(tmp_path):
    writer = _Writer()
    Validator([_write_bin(tmp_path / "cfp_fp.bin", 10)], DistState(), writer=writer).run(TinyNet(), 5, log=str)
    assert {t for t, _, s in writer.scalars if s == 5} >= {"val/cfp_fp/accuracy_flip", "val/cfp_fp/xnorm"}


def test_validator_bad_packs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        Validator([str(tmp_path / "missing.bin")], DistState())
    with pytest.raises(ValueError, match="odd count|11 images for 5 pairs"):
        Validator([_write_bin(tmp_path / "p1.bin", 5, odd=True)], DistState())
    with pytest.raises(ValueError, match="issame flags|10 images for 4 pairs"):
        Validator([_write_bin(tmp_path / "short.bin", 5, flags=4)], DistState())
    with pytest.raises(ValueError, match="at least one"):
        Validator([], DistState())


def _zero3_job(state: DistState, images: list, batch_size: int):
    import deepspeed

    skip_shm_build()  # as the trainer does: no C++ compiler needed
    model = TinyNet()
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=config)
    partitioned = all(p.numel() == 0 for p in engine.module.fc.parameters())
    emb, emb_flip = embed_images(engine.module, images, state, batch_size=batch_size)
    return emb, emb_flip, partitioned


@pytest.mark.slow
def test_embed_under_zero3_with_uneven_shares():
    # 9 images, batch 2, 2 ranks: shares of 5 and 4 images -> 3 batches each (rank 1 pads one); a rank
    # that skipped its last forward would leave the other waiting in ZeRO-3's parameter all-gather.
    images = _images(9)
    ref, ref_flip, _, _ = _embed_job(DistState(), images, 2, True)
    for emb, emb_flip, partitioned in run_distributed(_zero3_job, 2, images, 2, timeout=300):
        assert partitioned
        np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(emb_flip, ref_flip, rtol=1e-5, atol=1e-5)


class _NanNet(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float("nan")


def test_validator_reports_nan_for_a_diverged_model(tmp_path):
    validator = Validator([_write_bin(tmp_path / "lfw.bin", 10)], DistState())
    lines: list[str] = []
    validator.run(_NanNet(), 1, log=lines.append)
    assert lines[2:] == ["XNorm: nan", "Accuracy-Flip: nan+-nan"]
    assert validator.best == {} and validator.improved == []
    validator.run(TinyNet(), 2, log=lines.append)
    assert validator.improved == ["lfw"]
