"""The package layering and the absence of import cycles (contracts in pyproject.toml, import-linter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports not found: install the test extras (pip install -e '.[test]')")
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_import_contracts_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_build(tmp_path: Path) -> None:
    """The contracts are live: a copy of the package in which the head imports the trainer fails them."""
    shutil.copytree(ROOT / "megaface", tmp_path / "megaface", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    sharding = tmp_path / "megaface" / "head" / "sharding.py"
    sharding.write_text(sharding.read_text() + "\nimport megaface.train.loop  # noqa: E402,F401\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "megaface.head.sharding -> megaface.train.loop" in result.stdout
