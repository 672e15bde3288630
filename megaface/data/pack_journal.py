"""The resume journal of `megaface pack rec`: which images of a partial pack are complete on disk.

A pack is written in ``.<output>.partial`` next to its output. ``pack.journal`` there holds JSON lines: the
first names the job (a fingerprint of the image list and the options that change bytes), each later one is
written after a chunk's records and index lines were flushed and fsynced, with the image count done and the
size of every file then. A resumed run truncates the files to the last complete line's sizes (a kill may
leave half a chunk behind) and continues from the next image: the result is byte-identical to a run that was
never interrupted. A lock on the journal keeps two runs from writing one partial pack.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import IO

import numpy as np

from megaface.data.image_list import PathTable

JOURNAL_NAME = "pack.journal"


def partial_dir(output: Path) -> Path:
    """Where the pack for `output` is built (same filesystem, so the final rename is atomic)."""
    return output.with_name(f".{output.name}.partial")


def fingerprint(paths: PathTable, labels: np.ndarray, settings: dict) -> str:
    """sha256 over the image list (order, paths, labels) and the byte-changing settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for part in (*paths.raw(), np.ascontiguousarray(labels, dtype="<i8").tobytes()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class Journal:
    """An open, locked journal; `done` images complete with file `sizes` (relative path -> bytes)."""

    def __init__(self, directory: Path, handle: IO[str], header: dict, done: int, sizes: dict[str, int]) -> None:
        self.directory, self.handle, self.header = directory, handle, header
        self.done, self.sizes = done, sizes

    @classmethod
    def create(cls, directory: Path, header: dict, sizes: dict[str, int]) -> Journal:
        handle = _locked(directory / JOURNAL_NAME, "w")
        journal = cls(directory, handle, header, 0, {})
        journal._append(header)
        journal.commit(0, sizes)
        return journal

    @classmethod
    def open(cls, directory: Path) -> Journal | None:
        """The journal of a partial pack, or None when it has no complete first line (start over)."""
        path = directory / JOURNAL_NAME
        if not path.is_file():
            return None
        handle = _locked(path, "r+")
        lines, complete = [], 0
        for raw in handle.read().split("\n")[:-1]:  # the text after the last newline is a torn line
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                break
            complete += len(raw) + 1
        if len(lines) < 2 or "fingerprint" not in lines[0]:
            handle.close()
            return None
        handle.truncate(complete)  # drop a torn last line: the next append starts a line of its own
        handle.seek(complete)
        last = lines[-1]
        return cls(directory, handle, lines[0], int(last["done"]), dict(last["sizes"]))

    def commit(self, done: int, sizes: dict[str, int]) -> None:
        """Record that `done` images are complete; the data files must already be flushed."""
        for name in (n for n, size in sizes.items() if size != self.sizes.get(n)):
            with open(self.directory / name, "rb") as fh:
                os.fsync(fh.fileno())
        self._append({"done": done, "sizes": sizes})
        self.done, self.sizes = done, dict(sizes)

    def truncate_files(self) -> None:
        """Cut every data file back to its size at the last commit (drops a half-written chunk)."""
        for name, size in self.sizes.items():
            os.truncate(self.directory / name, size)

    def remove(self) -> None:
        self.close()
        (self.directory / JOURNAL_NAME).unlink(missing_ok=True)

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()  # releases the lock

    def _append(self, entry: dict) -> None:
        self.handle.write(json.dumps(entry, sort_keys=True) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())


def _locked(path: Path, mode: str) -> IO[str]:
    handle = open(path, mode, encoding="utf-8")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FileExistsError(f"{path.parent} is being written by another `megaface pack` (its journal is "
                              "locked); wait for it or stop it first") from None
    return handle
