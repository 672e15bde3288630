"""Console progress of long jobs (megaface.utils.progress): a bar under a real pty, plain lines when piped,
nothing on the ranks that are not the main one."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from megaface.utils.progress import Progress, progress_line
from tests.conftest import run_under_pty

ROOT = Path(__file__).resolve().parents[2]


SCRIPT = """
import sys, time
from megaface.utils.progress import Progress
with Progress("demo", total=50, unit="images", every=0.0) as p:
    for _ in range(50):
        time.sleep(0.002)
        p.update(1)
print("finished")
"""


def test_a_terminal_gets_a_bar_with_count_rate_and_eta() -> None:
    rc, out = run_under_pty([sys.executable, "-c", SCRIPT])
    assert rc == 0, out
    assert "\r" in out and "demo:" in out and "50/50" in out, out  # redrawn in place
    assert "images/s" in out and "<" in out, out  # tqdm's [elapsed<remaining, rate images/s]
    assert "ETA" not in out and "done in" not in out, out  # no plain lines on a terminal


def test_piped_output_gets_plain_lines_only() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr and "|" not in result.stderr, result.stderr
    assert len(lines) == 51, lines  # every=0: one line per update, then the final one
    assert lines[0].startswith("demo: 1/50 images, ") and ", ETA 0:00:" in lines[0], lines[0]
    assert lines[-1].startswith("demo: 50/50 images, ") and ", done in 0:00:0" in lines[-1], lines[-1]
    assert result.stdout == "finished\n"  # progress stays off stdout


def test_lines_are_periodic_not_per_item() -> None:
    out = io.StringIO()
    with Progress("pack", total=1000, unit="images", every=3600.0, stream=out) as p:
        for _ in range(1000):
            p.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pack: 1000/1000 images, "), lines


def test_only_the_main_rank_prints_and_counts_still() -> None:
    out = io.StringIO()
    p = Progress("embed", total=10, enabled=False, every=0.0, stream=out)
    p.update(10)
    p.write("a message")
    p.close()
    assert out.getvalue() == "" and p.done == 10
    off = Progress("embed", total=10, mode="off", every=0.0, stream=out)
    off.update(3)
    off.close()
    assert out.getvalue() == ""


def test_line_format_and_resumed_rate() -> None:
    assert progress_line("pack", 12000, 42000, "images", 4.0) == "pack: 12000/42000 images, 3000/s, ETA 0:00:10"
    assert progress_line("embed", 500, None, "images", 2.0) == "embed: 500 images, 250/s"
    assert progress_line("pack", 42000, 42000, "images", 14.0, final=True) == "pack: 42000/42000 images, 3000/s, done in 0:00:14"
    # resumed at 30000: 3000 new images in 1 s -> 3000/s, 9000 left -> 3 s
    assert progress_line("pack", 33000, 42000, "images", 1.0, initial=30000) == "pack: 33000/42000 images, 3000/s, ETA 0:00:03"


def test_a_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'sometimes' is not one of auto, on, off"):
        Progress("x", 1, mode="sometimes")  # type: ignore[arg-type]


def test_a_failed_job_prints_no_done_line() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress("pack", total=5, every=3600.0, stream=out) as p:
        p.update(1)
        raise RuntimeError("boom")
    assert out.getvalue() == ""
