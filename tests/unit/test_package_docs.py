"""Prose is code too: each package's docstring names each of its modules, so a module added or moved without
its line in the package's table of contents fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "megaface"
PACKAGES = sorted(p.parent for p in PACKAGE_ROOT.glob("*/__init__.py"))


def test_the_packages_were_found() -> None:
    assert len(PACKAGES) >= 9, PACKAGES  # config, checkpoint, convert, data, distributed, eval, head, models, train


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_package_docstring_names_every_module(package: Path) -> None:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text(encoding="utf-8"))) or ""
    modules = sorted(p.name for p in package.glob("*.py") if not p.name.startswith("__"))
    assert modules, f"{package} has no modules"
    missing = [name for name in modules if name not in doc]
    assert not missing, f"megaface/{package.name}/__init__.py's docstring does not name {missing}"
