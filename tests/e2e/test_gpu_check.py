"""benchmarks/gpu_check.py --dry-run: the one-GPU readiness check's plumbing on CPU (gloo, tiny sizes, bf16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a fresh process importing DeepSpeed and building five engines: 4-6 min on a loaded 2-core CPU
@pytest.mark.timeout(1500)
def test_gpu_check_dry_run_prints_one_passing_summary() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout + done.stderr
    summary = json.loads(lines[0])
    assert done.returncode == 0 and summary["ok"], summary
    assert summary["dry_run"] and summary["device"] == "cpu"
    assert all(run["finite"] and run["falls"] for run in summary["train"])
    assert summary["overflow"]["nonfinite_caught_at"] == 5
    assert summary["speed"]["backbone"]["samples_per_s"] > 0 and len(summary["speed"]["head"]) == 2
    assert all(len(v) == 2 and min(v) > 0 for v in summary["input"]["samples_per_s"].values())
    assert summary["input"]["bytes_per_image_to_device"] == {"old": 4 * 3 * 112 * 112, "new": 3 * 112 * 112}
    assert "CUDA" in summary["syncs"]["skipped"] and "compile" not in summary
