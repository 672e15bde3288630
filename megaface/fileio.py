"""Atomic file output: a reader sees the old file or the complete new one, never a partial write.

Everything megaface writes for others to read (checkpoints, backbone files, packs, embeddings, conversions,
ONNX models) goes through these context managers; a crash or an exception leaves the previous output intact
and no temporary behind. Results get the mode an ordinary `open(path, "w")` would give (0666 / 0777 minus the
umask), not the 0600 / 0700 of `tempfile`. An OSError raised inside the block (ENOSPC, EFBIG, EACCES, ...)
names the final path, so the command line can report which output could not be written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_like_open(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def output_error(err: OSError, tmp: Path, path: Path) -> OSError:
    """The error to raise: a copy naming the final output if `err` named the temporary (or no file)."""
    if err.errno is not None and err.filename2 is not None and str(err.filename2).startswith(str(tmp)):
        err = type(err)(err.errno, err.strerror)  # a copy into the temporary (src -> tmp/...): the output failed
    if err.errno is None or (err.filename is not None and not str(err.filename).startswith(str(tmp))):
        return err  # about some other file (an input read inside the block): leave it as it is
    named = type(err)(err.errno, err.strerror, str(path))
    named.__cause__ = err
    named.__suppress_context__ = True
    return named


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _chmod_like_open(Path(tmp), directory=False)
        yield Path(tmp)
        if fsync:  # small marker files ('latest') must survive a power loss along with the rename
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise output_error(err, Path(tmp), path)  # noqa: B904  (the cause is set inside)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_files(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Several files that belong together (an embedding and its sidecars): all renamed, or none.

    The renames happen one after another once the block succeeds; a failure inside the block leaves every
    previous file untouched.
    """
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_output_file(p)) for p in paths]


class _PythonLevelWriter:
    """A file seen by numpy as a plain object with `write`: numpy then writes in Python-level chunks.

    For a real file numpy uses `ndarray.tofile` (C stdio), whose final flush error is lost when the stream
    closes: under a full disk or `ulimit -f` `np.save` returned normally and left a truncated .npy.
    """

    def __init__(self, fh: Any) -> None:
        self.write = fh.write


def save_npy(path: str | os.PathLike, array: Any) -> None:
    """`np.save` to `path` itself (write it inside `atomic_output_file`); every write error raises."""
    import numpy as np

    with _naming_write_errors(path), open(path, "wb") as fh:
        np.save(_PythonLevelWriter(fh), array, allow_pickle=False)


def save_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Bytes to `path` itself (inside `atomic_output_file`); a failed write names `path`."""
    with _naming_write_errors(path):
        Path(path).write_bytes(data)


def save_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text to `path` itself (inside `atomic_output_file`); a failed write names `path`."""
    with _naming_write_errors(path):
        Path(path).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _naming_write_errors(path: str | os.PathLike) -> Iterator[None]:
    try:
        yield
    except OSError as err:  # a failed write names no file: name this one (several may be in flight)
        if err.filename is None and err.errno is not None:
            raise type(err)(err.errno, err.strerror, str(path)) from err
        raise


def make_temp_dir(target: Path) -> Path:
    """A fresh hidden sibling of `target` (same filesystem, so the final rename is atomic), mode as mkdir's."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    _chmod_like_open(tmp, directory=True)
    return tmp


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; it becomes `path` only if the block succeeds.

    Refuses an existing `path` (an output directory is never overwritten) unless `replace`: then the entries
    written into the temporary directory replace those of the same name in `path`, each an atomic rename.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; choose another output (-o) or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path)
    try:
        yield tmp
        move_into_place(tmp, path)
    except OSError as err:
        raise output_error(err, tmp, path)  # noqa: B904  (the cause is set inside)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    """Write text so that readers see either the old or the new content, never a partial file."""
    with atomic_output_file(path, fsync=fsync) as tmp:
        save_text(tmp, text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through `atomic_output_file`."""
    with atomic_output_file(path) as tmp:
        torch_save(obj, tmp)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` itself (write it inside an atomic block); a failed write is an OSError naming `path`.

    Given a file name, torch writes through C++ streams and a full disk or `ulimit -f` surfaces as
    `RuntimeError: [enforce fail at inline_container.cc] unexpected pos` (or `basic_ios::clear`), without
    errno. Given a Python file object it writes through Python, and the OSError behind that RuntimeError is
    its context: re-raised here; when torch gives none, the cause is read off the filesystem.
    """
    import torch

    with _naming_write_errors(path):
        try:
            with open(path, "wb") as fh:
                torch.save(obj, fh)
        except RuntimeError as err:
            raise _write_failure(err, Path(path)) from err


def _write_failure(err: RuntimeError, path: Path) -> BaseException:
    """The OSError behind torch's writer RuntimeError, or `err` itself when it is not a write failure."""
    context: BaseException | None = err
    while context is not None:
        if isinstance(context, OSError) and context.errno is not None:
            return type(context)(context.errno, context.strerror, str(path))
        context = context.__context__
    if "inline_container" not in str(err) and "iostream" not in str(err):
        return err
    import resource

    size = path.stat().st_size if path.exists() else 0
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and size >= soft:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
    if shutil.disk_usage(path.parent).free < (1 << 20):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"torch.save failed: {str(err).splitlines()[0]}", str(path))


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a file or a folder, file by file: the first failed copy raises its own OSError (with errno).

    `shutil.copytree` gathers failures into one `shutil.Error` without errno, which cannot say "disk full".
    """
    src, dst = Path(src), Path(dst)
    if src.is_file():
        shutil.copy2(src, dst)
        return
    for item in sorted(src.rglob("*")):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)


PLACED: list[Path] = []
"""Output directories renamed into place whole by this process (move_into_place, replace_dir), in order: a
command stopped after its output was placed says so (megaface.cli)."""


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename directory `tmp` to `target`; into an existing `target`, entry by entry."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
        PLACED.append(target)
        return
    for item in tmp.iterdir():
        os.replace(item, target / item.name)
    tmp.rmdir()
    PLACED.append(target)


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished directory `tmp` to `target`; an existing `target` is renamed aside first and removed
    after, so a reader sees the old directory or the new one, never a mix of their entries."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(tmp, target)
        PLACED.append(target)
        return
    old = target.with_name(f".{target.name}.old")
    if old.exists():  # left by an interrupted earlier replacement
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    target.rename(old)
    os.rename(tmp, target)
    PLACED.append(target)
    shutil.rmtree(old) if old.is_dir() else old.unlink()
