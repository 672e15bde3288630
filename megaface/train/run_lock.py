"""One training run per output directory: an exclusive lock file, OUTPUT/.megaface.lock.

The lock is an `fcntl.flock` on the file (released by the kernel when the holder dies, however it dies),
and the file names the holder (host, pid) so that a second run can say who has the directory. A lock file
left by a dead process is simply taken over, with a message. Where flock is unavailable (some network
filesystems answer ENOLCK, or a platform without fcntl) the file is created with O_EXCL instead; a file
left by a dead process on this host is then removed and taken over, one of another host is an error that
says how to remove it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Callable

from megaface.checkpoint.layout import LOCK_FILE


def _holder_text() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n"


def _read_holder(path: Path) -> dict[str, object]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputDirBusy(ValueError):
    """Another live run holds the output directory."""


def _busy(path: Path, holder: dict[str, object]) -> OutputDirBusy:
    return OutputDirBusy(
        f"output directory {path.parent} is in use by another megaface run (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, lock {path}): wait for it to finish, stop it, or use another --output")


class RunLock:
    """Held for the whole run by rank 0; `release()` (idempotent) unlocks and removes the file."""

    def __init__(self, output_dir: Path, log: Callable[[str], None]) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None
        # a run that fails before training (a config error) leaves no output directory it created itself
        self._created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._flock(log)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._exclusive_create(log)

    def _flock(self, log: Callable[[str], None]) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(self.path, _read_holder(self.path)) from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (and removed) the file between our open and our flock
            os.close(fd)
            raise _busy(self.path, {"pid": "?", "host": "? (it just finished; start again)"})
        old = _read_holder(self.path)
        if old.get("pid"):
            log(f"run lock: taking over {self.path} left by pid {old.get('pid')} on host {old.get('host')} "
                "(that process is gone)")
        os.ftruncate(fd, 0)
        os.write(fd, _holder_text().encode())
        self._fd = fd

    def _exclusive_create(self, log: Callable[[str], None]) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                old = _read_holder(self.path)
                pid = old.get("pid")
                if old.get("host") != socket.gethostname() or not isinstance(pid, int) or _pid_alive(pid):
                    raise _busy(self.path, old) from None
                log(f"run lock: removing the stale {self.path} of pid {pid} (no longer running)")
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, _holder_text().encode())
            os.close(fd)
            self._fd = -1
            return
        raise _busy(self.path, _read_holder(self.path))

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then creates a fresh file
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = None
        for directory in self._created:  # innermost first; only while still empty
            try:
                directory.rmdir()
            except OSError:
                break
