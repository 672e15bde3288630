"""Worker processes of `megaface pack rec`: records staged in files, so that no image byte crosses a pipe.

Each worker encodes a chunk (a function `encode(chunk) -> list of record bytes`) and writes the records into
``<staging>/<chunk id>.rec`` with one writev; it sends back only the records' lengths. The parent appends a
staged file to the pack with ``os.copy_file_range`` (a copy inside the kernel, page cache to page cache) and
deletes it before the pages are ever written to disk. This replaced a ``multiprocessing.Pool`` that returned
each chunk's records as one pickled bytes object: per image, the pickling, the pipe and the unpickling into
freshly faulted buffers, and the Pool's worker-handler thread (it polls the result pipe, so it spins while a
large result is in transit), cost the parent 0.03-0.04 ms of CPU per image, about twice what it spends now
(benchmarks/README.md has the measurements).

Chunks are handed out as workers ask (two in flight per worker, and never more than `window` chunks ahead
of the oldest one not yet taken by the parent), and results are yielded in chunk order. A worker's error (an
unreadable or corrupt image) is raised when its chunk's turn comes, so the chunks before it are complete. A
worker that dies (killed, out of memory) stops the pack with its exit code; the workers die with a SIGKILLed
parent (PR_SET_PDEATHSIG) and are killed when the parent leaves the `ChunkWorkers` block any other way.
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing
import os
import shutil
import signal
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

IOV_MAX = 1024
"""Buffers per writev call (Linux's limit)."""


def write_records(fd: int, records: list[bytes]) -> None:
    """All of `records`, in order, at `fd`'s position (writev: no joined copy of the chunk)."""
    for i in range(0, len(records), IOV_MAX):
        batch = records[i:i + IOV_MAX]
        total, written = sum(len(r) for r in batch), os.writev(fd, batch)
        if written < total:  # a short write (a signal, a full disk): the rest plainly, or its error
            _write_all(fd, b"".join(batch)[written:])


def append_range(src: int, dst: int, offset: int, count: int) -> None:
    """Bytes [offset, offset + count) of file `src` appended at `dst`'s position, copied by the kernel."""
    end = offset + count
    try:
        while offset < end:
            copied = os.copy_file_range(src, dst, end - offset, offset)
            if copied == 0:
                raise OSError(f"the staged chunk ended {end - offset} bytes early")
            offset += copied
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        # a file system or kernel without it: copy through user space
        while offset < end:
            block = os.pread(src, min(1 << 22, end - offset), offset)
            _write_all(dst, block)
            offset += len(block)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ChunkWorkers:
    """`workers` processes running `encode` over chunks; iterate `results(chunks)` inside the `with` block.

    Yields ``(path of the staged records, their lengths)`` per chunk, in order; a staged file is deleted when
    the next one is asked for (copy it before), and `staging` is removed when the block ends.
    """

    def __init__(self, encode: Callable[[Any], list[bytes]], workers: int, staging: Path, window: int) -> None:
        self.encode, self.workers, self.staging, self.window = encode, workers, staging, max(window, 2 * workers)
        self.processes: list[Any] = []
        self.connections: list[Connection] = []
        self._finished = 0  # workers told that no chunk follows

    def __enter__(self) -> ChunkWorkers:
        shutil.rmtree(self.staging, ignore_errors=True)  # chunks a killed run left behind
        self.staging.mkdir(parents=True)
        methods = multiprocessing.get_all_start_methods()
        context: Any = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        for _ in range(self.workers):
            ours, theirs = context.Pipe(duplex=True)
            process = context.Process(target=_worker_main, daemon=True, name="megaface-pack-worker",
                                      args=(self.encode, theirs, self.staging, os.getpid(), self.connections))
            process.start()
            theirs.close()
            self.processes.append(process)
            self.connections.append(ours)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._finish_workers()
        for conn in self.connections:
            conn.close()
        for process in self.processes:
            if exc[0] is not None:
                process.kill()  # an error or Ctrl-C: stop now, not after the chunks in flight
            process.join(timeout=None if exc[0] is None else 10)
        shutil.rmtree(self.staging, ignore_errors=True)

    def results(self, chunks: Iterable[Any]) -> Iterator[tuple[Path, array]]:
        source = iter(chunks)
        pending: dict[int, tuple[array | None, BaseException | None]] = {}  # chunk number -> back from a worker
        busy = dict.fromkeys(range(self.workers), 0)  # chunks each worker holds
        sent = taken = 0
        exhausted = False
        while True:
            # Two chunks per worker, so that none waits for the parent, dealt one at a time to the least busy
            # (the first chunks are the largest: dealing a worker two of them before the next has one leaves
            # one worker with twice the others' work at the start).
            while not exhausted and sent < taken + self.window:
                w = min(busy, key=lambda k: busy[k])
                if busy[w] >= 2:
                    break
                chunk = next(source, None)
                exhausted = chunk is None
                if chunk is not None:
                    self.connections[w].send((sent, chunk))
                    busy[w], sent = busy[w] + 1, sent + 1
            if exhausted:  # the workers may exit while the parent appends the last chunks
                self._finish_workers()
            if taken in pending:
                lengths, error = pending.pop(taken)
                if error is not None:
                    raise error
                assert lengths is not None  # a worker sends lengths or an error
                path = self.staging / f"{taken}.rec"
                yield path, lengths
                path.unlink()  # copied into the pack by now
                taken += 1
            elif exhausted and taken == sent:
                return
            else:
                # only the workers holding chunks: one told to finish may have closed its end already
                for conn in wait([self.connections[k] for k in busy if busy[k]]):
                    w = self.connections.index(conn)  # type: ignore[arg-type]  # wait() returns what it was given
                    number, lengths, error = self._receive(w)
                    busy[w] -= 1
                    pending[number] = (lengths, error)

    def _finish_workers(self) -> None:
        """Tell every worker there is nothing more (each returns after the chunks it holds), once."""
        for conn in self.connections[self._finished:]:
            try:
                conn.send(None)
            except OSError:
                pass
        self._finished = len(self.connections)

    def _receive(self, w: int) -> tuple[int, array | None, BaseException | None]:
        try:
            return self.connections[w].recv()
        except (EOFError, OSError):
            process = self.processes[w]
            process.join(timeout=5)
            raise RuntimeError(f"pack worker {process.pid} died (exit code {process.exitcode}); the chunks "
                               "packed before are kept: rerun with --resume") from None


def _worker_main(encode: Callable[[Any], list[bytes]], conn: Connection, staging: Path, parent: int,
                 others: list[Connection]) -> None:
    _die_with_parent(parent)
    for other in others:  # the parent's ends of the earlier workers' pipes (fork copies them)
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    while (task := conn.recv()) is not None:
        number, chunk = task
        try:
            records = encode(chunk)
            fd = os.open(staging / f"{number}.rec", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_records(fd, records)
            finally:
                os.close(fd)
            conn.send((number, array("q", map(len, records)), None))
        except Exception as err:  # noqa: BLE001  (sent to the parent, which raises it in chunk order)
            try:
                conn.send((number, None, err))
            except Exception:  # noqa: BLE001  (an error that does not pickle: send its text)
                conn.send((number, None, RuntimeError(f"{type(err).__name__}: {err}")))


def _die_with_parent(parent: int) -> None:
    # A SIGKILLed parent cannot stop its workers: ask Linux to kill them with it (and check that the parent
    # did not die before the request).
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)
