"""A store heartbeat: every rank says the same thing when one rank fails, stops or goes silent.

A collective only tells a rank that *something* went wrong: gloo's "Connection closed by peer" when a peer
exited after its own (clear) error, or a timeout naming nobody when a peer is stopped (SIGSTOP, a debugger,
swap) or hung. The heartbeat gives every rank the cause, through the job's rendezvous store
(MASTER_ADDR:MASTER_PORT, the same TCPStore the process group uses):

    <prefix>/beat/<rank>   a counter each rank's thread bumps every `interval_s`
    <prefix>/error         the first failure of the job, one line (whoever sets it first wins)
    <prefix>/ack           how many ranks have read it

Each rank's thread watches the next rank's counter only (a ring: two store reads per rank and interval, at
any world size). When it has not moved for `timeout_s` (train.collective_timeout_s) the watcher posts
"rank N sent no heartbeat for S s ..." and ends its process; a silent rank on the same host is sent
SIGKILL (a stopped process ignores everything else, and torchrun would wait 30 s more before killing it).
A rank that sees an error posted by another ends with that line: from its main thread when a collective
fails (`peer_error`), or from the watcher when the main thread stays blocked for longer than two beats.
When a collective fails and nobody posts an error, a rank ended without a word (SIGKILL, the OOM killer,
a lost host: its process is gone or its counter stopped) is named by `explain_lost_peer`.
An error that every rank raised by itself, after agreeing on it in a collective (a checkpoint that could
not be written), is not posted: each rank prints its own line, however late its main thread gets there;
a watcher acting on such a post would end a slow rank with the peer's line first, and the rank's own
exit status would be lost.
The thread reads the counter's changes on its own monotonic clock, so hosts need no synchronised clocks.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from megaface.distributed.state import DistState

EXIT_PEER_FAILED = 3  # the exit status of a rank ended because of another rank (as for a collective timeout)
_DONE = "done"


def _connect(timeout_s: float) -> dist.Store:
    """A client of the job's rendezvous store, under a prefix of this launch (torchrun restarts get a new one)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"megaface/heartbeat/{restart}", store)


class Heartbeat:
    """The heartbeat thread of one rank; `start` it after the process group exists, `stop` it at the end."""

    def __init__(self, state: DistState, timeout_s: float, interval_s: float | None = None,
                 prefix: str = "train", exit_process: Callable[[int], None] = os._exit) -> None:
        self.rank, self.world_size = state.rank, state.world_size
        # "address (host name)" from the start-up: the host name alone is the same on many hosts (a
        # container's, or /etc/hosts cloned across a cluster), so it neither names a lost host nor says
        # whether a silent rank runs here
        self.host = state.hosts[state.rank] if state.hosts else socket.gethostname()
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s if interval_s is not None else max(0.5, min(2.0, self.timeout_s / 10))
        self.prefix = prefix
        self._exit = exit_process
        self._store: dist.Store | None = None
        self._reader: dist.Store | None = None  # the main thread's own connection (clients are not shared)
        self._stop = threading.Event()
        self._reported = threading.Lock()  # one line per process, from whichever thread gets there first
        self._thread: threading.Thread | None = None
        self._acked = False  # this rank has told the failing rank it read its error (it may then exit)
        self._ack_lock = threading.Lock()  # the watcher and the main thread may both ack; count one
        self.peer_quiet_s = 0.0  # how long the watched rank's counter has not moved (0 while it beats)

    # ---- life cycle ----------------------------------------------------------------------------------

    def start(self) -> "Heartbeat":
        if self.world_size < 2:
            return self
        store_timeout = max(2 * self.interval_s, 5.0)
        try:
            store = _connect(store_timeout)
            reader = _connect(store_timeout)
            store.set(f"who/{self.rank}", f"{os.getpid()} {self.host}")
            store.set(f"beat/{self.rank}", "0")
        except (RuntimeError, OSError, KeyError, ValueError) as err:  # no store to reach: train without it
            warnings.warn(f"rank {self.rank}: no store heartbeat ({' '.join(str(err).split())[:200]}); a failed "
                          "or silent rank then ends the job only through train.collective_timeout_s",
                          UserWarning, stacklevel=2)
            return self
        self._store, self._reader = store, reader
        self._thread = threading.Thread(target=self._run, name="megaface-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """A finished rank: its silence from now on is no failure."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 5)
        self._thread = None
        try:
            if self._store is not None:
                self._store.set(f"beat/{self.rank}", _DONE)
        except (RuntimeError, OSError):
            pass  # the store's host (launcher or rank 0) is gone: nobody is left to read it

    # ---- errors ----------------------------------------------------------------------------------------

    def report_error(self, line: str, wait_s: float | None = None, every_rank: bool = False) -> None:
        """Post this rank's one-line error for the others (the first error of the job wins) and give them
        up to `wait_s` to read it (rank 0 may host the store, which ends with this process). `every_rank`:
        every rank raised this error itself (agreed in a collective): nothing is posted (module docstring)."""
        self._reported.acquire(blocking=False)  # this rank has printed its own line: the watcher stays quiet
        if self._reader is None or every_rank:
            return
        mine = f"rank {self.rank}: {line}"
        with self._ack_lock:  # from here this rank's watcher never acks: its own error is not read by a peer
            had_acked, self._acked = self._acked, True
        try:
            posted = self._reader.compare_set("error", "", mine).decode()
            if posted != mine:  # another rank's error came first: this rank has read it; nobody waits on it
                if not had_acked:
                    self._reader.add("ack", 1)
                return
            deadline = time.monotonic() + (2 * self.interval_s + 1 if wait_s is None else wait_s)
            while time.monotonic() < deadline and int(self._reader.add("ack", 0)) < self.world_size - 1:
                time.sleep(0.1)
        except (RuntimeError, OSError):
            pass

    def peer_error(self) -> str | None:
        """Another rank's posted error (one line), marked as read; None when there is none or no store."""
        if self._reader is None:
            return None
        try:
            if not self._reader.check(["error"]):
                return None
            message = self._reader.get("error").decode()
            self._ack(self._reader)
            return message
        except (RuntimeError, OSError):
            return None

    def take_report(self) -> bool:
        """True once per process: the caller prints the line (main thread or watcher, never both)."""
        return self._reported.acquire(blocking=False)

    # ---- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        store = self._store
        assert store is not None  # started by `start`, after the connection
        peer = (self.rank + 1) % self.world_size
        count, seen, seen_at = 0, None, time.monotonic()
        error_seen_at: float | None = None
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                count += 1
                store.set(f"beat/{self.rank}", str(count))
                if store.check(["error"]):
                    self._ack(store)  # the failing rank may exit now: our collective then fails at once
                    error_seen_at = error_seen_at or now
                    if now - error_seen_at >= 2 * self.interval_s:  # the main thread is still blocked
                        self._end(store.get("error").decode())
                    continue
                value = store.get(f"beat/{peer}").decode() if store.check([f"beat/{peer}"]) else None
            except (RuntimeError, OSError) as err:  # the store does not answer: its host is stopped or gone
                if now - seen_at > self.timeout_s:
                    self._end(f"the job's store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                              f"has not answered for {now - seen_at:.0f} s ({str(err).splitlines()[0][:120]}): the "
                              "launcher or rank 0 is stopped or gone; check its log and host, then resume with "
                              "--resume latest")
                continue
            if value == _DONE or value != seen:
                seen, seen_at = value, now
                continue
            self.peer_quiet_s = now - seen_at
            if now - seen_at > self.timeout_s:
                self._end(self._silent(peer, now - seen_at, store))

    def _silent(self, peer: int, seconds: float, store: dist.Store) -> str:
        """Post (first one wins) and return the line naming the silent `peer`; SIGKILL it when it is local."""
        host, pid = _parse_who(store.get(f"who/{peer}").decode() if store.check([f"who/{peer}"]) else None)
        line = (f"rank {peer} (pid {pid} on {host}) sent no heartbeat for {seconds:.0f} s (train."
                f"collective_timeout_s={self.timeout_s:g}): it is stopped (SIGSTOP, a debugger), swapping or hung; "
                "the job is ended. Check that rank's host, then resume with --resume latest")
        try:
            store.compare_set("error", "", f"rank {self.rank}: {line}")
            line = store.get("error").decode()  # another rank may have posted first: say the same
        except (RuntimeError, OSError):
            line = f"rank {self.rank}: {line}"
        if pid is not None and host == self.host:
            try:
                os.kill(pid, signal.SIGKILL)  # a stopped process takes no other signal; the launcher would wait
            except (ProcessLookupError, PermissionError):
                pass
        return line

    def explain_timeout(self) -> str | None:
        """After a collective timed out in the main thread: the silent rank's line (as the watcher would have
        posted it), or None when the watched rank still beats (the backend's message is all there is)."""
        if self._reader is None or self.peer_quiet_s < 2 * self.interval_s:
            return None
        try:
            return self._silent((self.rank + 1) % self.world_size, self.peer_quiet_s, self._reader)
        except (RuntimeError, OSError):
            return None

    def explain_lost_peer(self) -> str | None:
        """After a collective failed with no error posted (gloo's "Connection closed by peer"): the line naming
        a rank that ended without a word (SIGKILL from the OOM killer, kill -9, a lost host), posted for the
        others, or the error a peer posts meanwhile (it may be just about to); None when every rank is alive."""
        if self._reader is None:
            return None
        try:
            start = {r: self._value(f"beat/{r}") for r in range(self.world_size) if r != self.rank}
            deadline = time.monotonic() + 2 * self.interval_s + 1
            while time.monotonic() < deadline:
                if (posted := self.peer_error()) is not None:
                    return posted
                lost = [r for r in start if self._gone(r)]
                if lost:
                    return self._lost(lost[0], "its process is gone")
                time.sleep(0.1)
            quiet = [r for r, beat in start.items() if beat not in (None, _DONE) and self._value(f"beat/{r}") == beat]
            return self._lost(quiet[0], "its heartbeat stopped") if quiet else None
        except (RuntimeError, OSError):
            return None

    def _value(self, key: str) -> str | None:
        assert self._reader is not None
        return self._reader.get(key).decode() if self._reader.check([key]) else None

    def _who(self, rank: int) -> tuple[str, int | None]:
        return _parse_who(self._value(f"who/{rank}"))

    def _gone(self, rank: int) -> bool:
        """A rank on this host whose process no longer runs (or is a zombie its launcher has not reaped)."""
        host, pid = self._who(rank)
        if pid is None or host != self.host or self._value(f"beat/{rank}") == _DONE:
            return False
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
        except (FileNotFoundError, IndexError):
            return True

    def _lost(self, rank: int, how: str) -> str:
        host, pid = self._who(rank)
        line = (f"rank {rank} (pid {pid} on {host}) ended without an error line ({how}): it was killed (the OOM "
                "killer, kill -9) or its host went down; the job is ended. Check that host (dmesg for the OOM "
                "killer), then resume with --resume latest")
        assert self._reader is not None
        self._reader.compare_set("error", "", f"rank {self.rank}: {line}")
        return self._reader.get("error").decode()  # another rank may have posted first: say the same

    def _ack(self, store: dist.Store) -> None:
        with self._ack_lock:
            if self._acked:
                return
            self._acked = True
        store.add("ack", 1)

    def _end(self, line: str) -> None:
        if self.take_report():
            print(f"{prefix_of(self.rank)}megaface {self.prefix}: error: {line}", file=sys.stderr, flush=True)
            self._exit(EXIT_PEER_FAILED)
        self._stop.set()


def _parse_who(value: str | None) -> tuple[str, int | None]:
    """(host as "address (host name)", pid) from a `who/<rank>` value "pid host"; ("?", None) if unknown."""
    who = (value or "").split(" ", 1)
    return (who[1], int(who[0])) if len(who) == 2 and who[0].isdigit() else ("?", None)


def prefix_of(rank: int) -> str:
    return f"[rank {rank}] "
