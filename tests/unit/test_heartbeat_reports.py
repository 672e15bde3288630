"""The store heartbeat's error reports, in one process: two `Heartbeat`s (ranks 0 and 1) on a real TCPStore.

- a rank's own watcher never counts as a reader of its own error, so the failing rank waits for its peers;
- an error every rank raised itself (`every_rank=True`, a checkpoint that could not be written) is not
  posted, so no watcher ends a rank that is late to print its own line;
- a rank that ended without a word (SIGKILL) is named after a collective fails with nothing posted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
import torch.distributed as dist

from megaface.distributed import DistState
from megaface.distributed.heartbeat import Heartbeat
from tests.conftest import free_port

INTERVAL = 0.2


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> dist.Store:
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    return dist.PrefixStore("megaface/heartbeat/0", server)


def _beat(rank: int, exits: list[tuple[int, int]]) -> Heartbeat:
    return Heartbeat(DistState(rank=rank, world_size=2), timeout_s=30, interval_s=INTERVAL,
                     exit_process=lambda code: exits.append((rank, code))).start()


def test_failing_rank_waits_for_its_peer_not_for_its_own_watcher(store: dist.Store) -> None:
    exits: list[tuple[int, int]] = []
    failing = _beat(0, exits)
    try:
        time.sleep(3 * INTERVAL)  # the watcher runs, and would see the error at its next beat
        started = time.monotonic()
        failing.report_error("checkpoint step_1 not saved", wait_s=6 * INTERVAL)
        waited = time.monotonic() - started
    finally:
        failing.stop()
    assert store.get("error").decode() == "rank 0: checkpoint step_1 not saved"
    assert int(store.add("ack", 0)) == 0 and waited >= 5 * INTERVAL, waited  # nobody read it: it waited it out
    assert exits == []


def test_error_every_rank_raised_is_not_posted_and_a_late_rank_is_not_ended(store: dist.Store) -> None:
    exits: list[tuple[int, int]] = []
    first, late = _beat(0, exits), _beat(1, exits)
    try:
        first.report_error("checkpoint step_1 not saved: rank 0 cannot write x", every_rank=True)
        time.sleep(12 * INTERVAL)  # the late rank's watcher had many beats to end it, were the error posted
        late.report_error("checkpoint step_1 not saved: rank 0 cannot write x", every_rank=True)
    finally:
        first.stop()
        late.stop()
    assert not store.check(["error"]) and exits == []
    assert not late.take_report()  # its own line was printed: the watcher stays quiet from now on


def test_peer_that_reports_second_acks_the_first_error(store: dist.Store) -> None:
    exits: list[tuple[int, int]] = []
    first, second = _beat(0, exits), _beat(1, exits)
    try:
        first.report_error("bad label 7 in train.rec", wait_s=0)
        second.report_error("bad label 9 in train.rec", wait_s=0)  # its own error came second: it read rank 0's
        assert second.peer_error() == "rank 0: bad label 7 in train.rec"
    finally:
        first.stop()
        second.stop()
    assert int(store.add("ack", 0)) == 1 and exits == []


def test_a_rank_killed_without_a_word_is_named(store: dist.Store) -> None:
    """A collective failed and nobody posted: a peer whose process is gone (SIGKILL, the OOM killer) is named
    by pid and host; one on another host whose counter stopped is named too; live, beating ranks are not."""
    exits: list[tuple[int, int]] = []
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid no longer runs
    survivor = _beat(0, exits)
    try:
        store.set("who/1", f"{gone.pid} {socket.gethostname()}")  # "pid host"
        store.set("beat/1", "7")
        line = survivor.explain_lost_peer()
        assert line is not None and line.startswith(f"rank 0: rank 1 (pid {gone.pid} on {socket.gethostname()}) "
                                                    "ended without an error line (its process is gone)"), line
        assert store.get("error").decode() == line  # posted for the other ranks
        store.delete_key("error")
        store.set("who/1", f"{os.getpid()} 10.0.0.9 (elsewhere)")  # remote: only its counter tells
        line = survivor.explain_lost_peer()
        assert line is not None and "rank 1 (pid" in line and "(its heartbeat stopped)" in line, line
        store.delete_key("error")
        store.set("who/1", f"{os.getpid()} {socket.gethostname()}")
        store.set("beat/1", "done")  # a rank that finished is not lost
        assert survivor.explain_lost_peer() is None
    finally:
        survivor.stop()
    assert exits == []
