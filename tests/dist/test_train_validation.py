"""Validation during a 2-rank training scores the same model that its checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import deepspeed  # noqa: F401  - imported before forking so that each rank starts in about a second
import numpy as np
import pytest

from megaface.distributed import DistState
from tests.conftest import run_distributed
from tests.conftest import tiny_args, wrapped


def _validating_worker(state: DistState, argv: list[str]) -> dict[str, Any]:
    from megaface import train
    from megaface.eval import validation

    results: list[dict[str, Any]] = []

    def recording(original: Callable[..., Any]) -> Callable[..., Any]:
        def record(self, model, iteration, log=print):  # type: ignore[no-untyped-def]
            out = original(self, model, iteration, log=lambda *_: None)
            results.append({name: {"xnorm": r["xnorm"], "accuracy": r["accuracy"]} for name, r in out.items()})
            return out
        return record

    with wrapped(validation.Validator, "run", recording):
        code = train.main(argv)
    return {"code": code, "results": results}


def test_validation_during_training_matches_the_saved_checkpoint(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # BatchNorm running statistics of the two ranks drift apart during training; validation must use the
    # checkpoint's (rank 0's), so that `megaface eval` of the checkpoint prints the same numbers.
    argv = tiny_args(cache, tmp_path / "run", 6, "--validation.interval=6", "--validation.synthetic=true")
    out = run_distributed(_validating_worker, 2, argv)
    assert [r["code"] for r in out] == [0, 0]
    during = out[0]["results"][-1]
    assert out[1]["results"][-1] == during
    (bin_path,) = cache.glob("*/val.bin")

    from megaface.checkpoint import load_backbone
    from megaface.data import load_bin
    from megaface.eval.embed import embed_images
    from megaface.eval.verification import evaluate

    model, meta = load_backbone(tmp_path / "run")
    images, issame = load_bin(bin_path)
    emb, emb_flip = embed_images(model, images, DistState(), normalize=meta.get("normalize", "arcface_torch"))
    after = evaluate(emb, emb_flip, issame)
    (name,) = during
    assert during[name]["xnorm"] == pytest.approx(after["xnorm"], rel=1e-5)
    assert during[name]["accuracy"] == pytest.approx(after["accuracy"], abs=1e-9)
    assert np.isfinite(after["xnorm"])
