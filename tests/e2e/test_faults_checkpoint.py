"""Checkpoint faults: a diverging run whose BatchNorm statistics turn inf before its loss does, and a
checkpoint save that hits a full disk (the file-size limit, `ulimit -f`).

What must hold: every tensor of every checkpoint left behind is finite and `latest` names one of them; a
failed save leaves the previous checkpoint `latest` and intact, no temporary, one line per rank naming the
path and the free space, and every rank exits.
"""

from __future__ import annotations

from pathlib import Path

from megaface.checkpoint import find_checkpoint, read_meta
from megaface.checkpoint.integrity import finite_problems, list_files, non_finite_tensors
from tests.conftest import _train, tiny_args
from tests.support.job_utils import torchrun


def test_huge_lr_leaves_only_finite_checkpoints(tmp_path: Path) -> None:
    """lr 1e6 with a save every iteration and keep_last=1: BatchNorm running_var turns inf while the loss is
    still finite; that state must not be saved (nor the one pruning would then leave alone)."""
    out = tmp_path / "run"
    code, text, _ = _train(tiny_args(tmp_path / "cache", out, 8, "--optim.lr=1e6", "--save-every", "1",
                                     "--train.keep_last=1"))
    assert code == 1, text
    tags = sorted(p for p in (out / "checkpoints").glob("step_*") if p.is_dir())
    assert tags, text  # the first iterations are finite: something usable is left
    latest = find_checkpoint("latest", out)
    assert latest in tags and read_meta(latest)["verified_finite"] is True
    assert f"the last healthy checkpoint is {latest}" in text
    for tag in tags:  # read back every tensor of every file that remains
        torch_files = [rel for rel in list_files(tag) if rel.endswith(".pt")]
        assert any(rel.startswith("ds/") for rel in torch_files) and any(rel.startswith("fc7/") for rel in
                                                                          torch_files)
        assert finite_problems(tag) == [], text
        assert all(non_finite_tensors(tag / rel) == [] for rel in torch_files)


def test_full_disk_during_a_save_under_torchrun(tmp_path: Path) -> None:
    """2 ranks; only rank 0 writes DeepSpeed's model states, which exceed the file-size limit: rank 0's write
    fails, rank 1's succeed, and both must end with their own line naming rank 0's file while step 2 stays
    `latest`. Rank 1 reaches its line 8 s late (three heartbeats at the default collective_timeout_s), as a
    rank descheduled on a loaded CI host did: its heartbeat watcher used to end it first with rank 0's line
    and status 3 (rank 1's own line missing, rank 0 then killed by torchrun)."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    first = torchrun(tiny_args(cache, out, 2), tmp_path / "first.log")
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    previous = out / "checkpoints" / "step_00000002"
    before = {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    model_states = previous / "ds" / "mp_rank_00_model_states.pt"
    limit = model_states.stat().st_size // 2
    assert all(p.stat().st_size < limit for p in before if p != model_states)  # only rank 0's big file fails
    log, exits = tmp_path / "second.log", tmp_path / "exits"
    exits.mkdir()
    second = torchrun(tiny_args(cache, out, 4, "--resume", "latest", "--save-every", "1"), log,
                      module="tests.support.fault_entry", limit_bytes=limit,
                      env={"MEGAFACE_TEST_LATE_REPORT": "1:8", "MEGAFACE_TEST_EXIT_DIR": str(exits)})
    second.wait(timeout=300)
    text = log.read_text()
    errors = [line for line in text.splitlines() if "megaface train: error:" in line]
    assert len(errors) == 2 and {line.split("]")[0] for line in errors} == {"[rank 0", "[rank 1"}, text[-4000:]
    for line in errors:  # each rank's own line (not the peer path's "rank 0: ..."), naming the rank that failed
        assert "megaface train: error: checkpoint step_00000003 not saved: rank 0 cannot write" in line, line
        assert "mp_rank_00_model_states.pt" in line and "free on" in line and "ulimit -f" in line, line
        assert "step_00000002 is still latest" in line and "--resume latest" in line, line
    assert "enforce fail" not in text and "unexpected pos" not in text, text[-4000:]
    frames = [line for line in text.splitlines() if line.strip().startswith('File "')]
    assert all("torch/distributed/" in f or "<frozen runpy>" in f for f in frames), text[-4000:]  # torchrun's own
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"rank_0": "1", "rank_1": "1"}, text[-4000:]
    assert find_checkpoint("latest", out) == previous
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()} == before
