"""model.compile: torch.compile of the backbone inside the DeepSpeed engine (ZeRO 0-2), exact resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megaface.train.build import check_compile
from tests.conftest import run_distributed
from tests.conftest import tiny_args, train_worker


def test_refusals_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="ZeRO stages 0-2 .* set model.compile=false"):
        check_compile(3, torch.device("cpu"))
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler .*apt-get install g\\+\\+"):
        check_compile(1, torch.device("cpu"))
    check_compile(2, torch.device("cuda"))  # on a GPU inductor writes Triton, no C++ compiler needed


@pytest.mark.slow  # inductor compiles the backbone on the CPU: minutes on this machine
@pytest.mark.timeout(1800)
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler for inductor")
def test_compiled_run_resumes_exactly_and_matches_eager(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ("--model.compile=true", "--data.synthetic.identities=8", "--data.synthetic.images_per_identity=2")
    full = run_distributed(train_worker, 2, tiny_args(cache, tmp_path / "a", 4, "--save-every", "2", *args))
    assert [r["code"] for r in full] == [0, 0]
    resumed = run_distributed(train_worker, 2, tiny_args(cache, tmp_path / "b", 4, "--resume",
                                                         str(tmp_path / "a" / "checkpoints" / "step_00000002"), *args))
    assert resumed[0]["losses"] == full[0]["losses"][2:]
    eager = run_distributed(train_worker, 2, tiny_args(cache, tmp_path / "c", 4, *args[1:]))
    assert eager[0]["losses"] == pytest.approx(full[0]["losses"], rel=1e-3)  # same math, other kernels
