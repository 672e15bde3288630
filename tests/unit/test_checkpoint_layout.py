"""The checkpoint's file names: pinned literally (they are an on-disk format that other tools and older
checkpoints rely on) and defined only in `megaface/checkpoint/layout.py`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from megaface.checkpoint import layout
from megaface.checkpoint.integrity import file_owner

ROOT = Path(__file__).resolve().parents[2] / "megaface"


def test_names_are_the_on_disk_format():
    assert (layout.CHECKPOINTS_DIR, layout.LATEST, layout.META_FILE) == ("checkpoints", "latest", "meta.json")
    assert (layout.DS_DIR, layout.FC7_DIR, layout.TRAINER_DIR) == ("ds", "fc7", "trainer")
    assert layout.tag_for(1000) == "step_00001000"
    assert layout.tmp_tag_name("step_00001000") == "step_00001000.tmp"
    assert layout.trainer_file_name(3) == "rank_00003.pt"
    assert layout.fc7_shard_file_name(1, 12) == "shard_00001_of_00012.pt"
    assert layout.best_file_name("lfw") == "best_lfw.pt"
    assert str(layout.sidecar_path(Path("run") / "best_lfw.pt")) == str(Path("run") / "best_lfw.pt.json")
    assert layout.LOCK_FILE == ".megaface.lock"
    assert layout.DS_MODEL_STATES == "mp_rank_00_model_states.pt"
    assert layout.ds_optim_file_name(2) == "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    assert layout.ds_optim_file_name(2, bf16=True) == "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    assert layout.ds_zero3_model_file_name(1) == "zero_pp_rank_1_mp_rank_00_model_states.pt"


def test_patterns_match_the_names_they_parse():
    assert tuple(map(int, layout.FC7_SHARD_FILE.match(layout.fc7_shard_file_name(7, 9)).groups())) == (7, 9)
    assert int(layout.TRAINER_FILE.match(layout.trainer_file_name(4)).group(1)) == 4
    assert int(layout.DS_OPTIM_FILE.match(layout.ds_optim_file_name(5, bf16=True)).group(2)) == 5
    assert int(layout.DS_ZERO3_MODEL_FILE.match(layout.ds_zero3_model_file_name(6)).group(1)) == 6
    assert not layout.FC7_SHARD_FILE.match("shard_00001_of_00002.pt.bak")
    assert Path("best_lfw.pt.json").match(layout.BEST_SIDECAR_GLOB)
    assert Path(layout.fc7_shard_file_name(0, 1)).match(layout.FC7_SHARD_GLOB)


@pytest.mark.parametrize(("rel_path", "world_size", "owner"), [
    ("trainer/rank_00002.pt", 3, 2),
    ("fc7/shard_00001_of_00003.pt", 3, 1),
    ("ds/zero_pp_rank_2_mp_rank_00_optim_states.pt", 3, 2),
    ("ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 3, 1),
    ("ds/zero_pp_rank_4_mp_rank_00_model_states.pt", 3, 1),   # a file of rank 4 at world size 3 -> rank 1
    ("ds/mp_rank_00_model_states.pt", 3, 0),                  # no rank in the name: rank 0 hashes it
    ("trainer/rank_00002.pt.bak", 3, 0),
    ("ds/xrank_00002.pt", 3, 0),
])
def test_file_owner_reads_the_rank_from_the_layout_names(rel_path, world_size, owner):
    assert file_owner(rel_path, world_size) == owner


# A string constant that looks like a checkpoint file name or pattern (not a docstring, not an identifier
# such as a function name in __all__). layout.py is their one home; fileio.py's ".tmp" names its own
# temporary files (any file, not the checkpoint layout).
_NAME_LIKE = re.compile(r"^\^?(?:\(\?:\^\|/\))?(?:bf16_)?(?:shard_|rank_|best_|zero_pp_rank_|step_|mp_rank_)")
_EXACT = {layout.LOCK_FILE, layout.META_FILE, layout.LATEST, layout.DS_MODEL_STATES, layout.TMP_SUFFIX}
_ALLOWED = {("fileio.py", ".tmp")}


def _name_literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        text = node.value
        looks_like_name = (_NAME_LIKE.match(text) and not (text.isidentifier() and not text.endswith("_"))) \
            or any(part in text for part in ("zero_pp_rank", "mp_rank_00", ".megaface.lock"))
        if (looks_like_name or text in _EXACT) and (path.name, text) not in _ALLOWED:
            found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {text!r}")
    return found


def test_checkpoint_names_are_defined_only_in_layout():
    files = [p for p in sorted(ROOT.rglob("*.py")) if p != ROOT / "checkpoint" / "layout.py"]
    assert len(files) > 50, f"the scan found only {len(files)} modules under {ROOT}"
    found = [line for path in files for line in _name_literals(path)]
    assert found == [], "checkpoint file names outside megaface/checkpoint/layout.py (import them from there):\n" \
        + "\n".join(found)
