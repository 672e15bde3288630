"""The worker processes of `pack rec` (megaface.data.pack_workers): chunks come back in order with their staged
records, a worker's error is raised at its chunk's turn, a dead worker stops the pack, and the kernel copy
appends exactly the bytes asked for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from megaface.data.pack_workers import ChunkWorkers, append_range, write_records


def _records(chunk: tuple[int, int]) -> list[bytes]:
    start, count = chunk
    if start == 666:
        raise ValueError("image 666: corrupt")
    if start == 999:
        os._exit(7)  # a worker killed mid-chunk (out of memory, a signal)
    return [bytes([i % 251]) * (1 + (i * 37) % 300) for i in range(start, start + count)]


def test_chunks_come_back_in_order_with_their_staged_records(tmp_path: Path) -> None:
    chunks = [(start, 1 + start % 7) for start in range(0, 400, 10)]
    got = []
    with ChunkWorkers(_records, 3, tmp_path / "staging", window=8) as workers:
        for path, lengths in workers.results(chunks):
            data = path.read_bytes()
            assert list(lengths) == [len(r) for r in _records(chunks[len(got)])]
            got.append(data)
            assert len(list((tmp_path / "staging").iterdir())) <= 8  # the window bounds the staged chunks
    assert got == [b"".join(_records(c)) for c in chunks]
    assert not (tmp_path / "staging").exists()


def test_an_error_is_raised_at_its_chunks_turn(tmp_path: Path) -> None:
    chunks = [(0, 5), (10, 5), (666, 1), (20, 5)]
    taken = []
    with pytest.raises(ValueError, match="image 666: corrupt"), \
            ChunkWorkers(_records, 2, tmp_path / "staging", window=4) as workers:
        for _, lengths in workers.results(chunks):
            taken.append(len(lengths))
    assert taken == [5, 5] and not (tmp_path / "staging").exists()


@pytest.mark.timeout(60)
def test_a_dead_worker_stops_the_pack_with_its_exit_code(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"pack worker \d+ died \(exit code 7\)"), \
            ChunkWorkers(_records, 2, tmp_path / "staging", window=4) as workers:
        for _ in workers.results([(0, 3), (999, 1), (5, 3), (9, 3)]):
            pass


def test_append_range_copies_the_asked_bytes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    payload = os.urandom(3 << 20)
    fd = os.open(src, os.O_WRONLY | os.O_CREAT)
    write_records(fd, [payload[i:i + 1000] for i in range(0, len(payload), 1000)])  # > IOV_MAX buffers
    os.close(fd)
    dst.write_bytes(b"head")
    with open(src, "rb") as s, open(dst, "r+b") as d:
        d.seek(0, os.SEEK_END)
        append_range(s.fileno(), d.fileno(), 12345, 2 << 20)
        append_range(s.fileno(), d.fileno(), 0, 10)
    assert dst.read_bytes() == b"head" + payload[12345:12345 + (2 << 20)] + payload[:10]


def _pid(chunk: int) -> list[bytes]:
    return [str(os.getpid()).encode()]


def test_the_first_chunks_are_dealt_one_per_worker(tmp_path: Path) -> None:
    # The first chunks are the largest (chunk_bounds shrinks them towards the end): a worker dealt the first
    # two while the other got the next two would carry twice the other's work from the start.
    with ChunkWorkers(_pid, 2, tmp_path / "staging", window=8) as workers:
        owners = [path.read_bytes() for path, _ in workers.results(range(4))]
    assert owners[0] != owners[1] and sorted(owners[:2]) == sorted(owners[2:])
