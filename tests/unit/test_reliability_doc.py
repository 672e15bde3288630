"""docs/reliability.md stays true to the tests: every `tests/...py::name` it points to exists, and the fault
table keeps at least 60 rows (issue 20)."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

DOC = ROOT / "docs" / "reliability.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _defined(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_every_test_named_in_reliability_md_exists() -> None:
    references = REFERENCE.findall(DOC.read_text())
    assert len(references) >= 40, f"only {len(references)} test references found in {DOC}: has the format changed?"
    missing = [f"{path}::{name}" for path, name in references
               if not (ROOT / path).is_file() or name not in _defined(path)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_fault_table_has_at_least_60_rows() -> None:
    rows = re.findall(r"^\| \d+ \|", DOC.read_text(), flags=re.M)
    assert len(rows) >= 60, len(rows)
    assert not (ROOT / "docs" / "reliability_train.md").exists()  # merged into reliability.md
