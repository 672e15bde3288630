"""One line for every error the environment or a damaged input file can cause (no traceback).

`describe_error` writes `<what> (<file>): <why>; <what to do>`; the command line prefixes
`megaface <cmd>: error: ` and exits with status 1. Anything not listed in `EXPECTED_ERRORS` is a bug in
megaface and keeps its traceback.
"""

from __future__ import annotations

import errno
import pickle

import yaml

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (OSError, yaml.YAMLError, pickle.UnpicklingError, EOFError,
                                                    UnicodeDecodeError, MemoryError)

# errno -> (why, what to do)
_OS_ADVICE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free space there or write the output elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota or write the output elsewhere"),
    errno.EFBIG: ("file too large for the file-size limit or the filesystem",
                  "raise the limit (ulimit -f) or write to a filesystem that allows larger files"),
    errno.EACCES: ("permission denied", "check the permissions of the file and its folder, or choose another path"),
    errno.EPERM: ("operation not permitted", "check the permissions of the file and its folder"),
    errno.EROFS: ("read-only filesystem", "write the output to a writable location"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("a component of the path is not a directory", "check the path"),
    errno.EISDIR: ("is a directory", "give a file path"),
    errno.EIO: ("input/output error", "the disk or network filesystem failed: check it and retry"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer data workers"),
    errno.ENOMEM: ("out of memory", "use fewer workers or a smaller batch"),
}


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _os_error(err: OSError) -> str:
    why, todo = _OS_ADVICE.get(err.errno or -1, (err.strerror or str(err), "check the path and retry"))
    name = errno.errorcode.get(err.errno or -1, "")
    where = f" ({err.filename})" if err.filename is not None else ""
    if err.filename2 is not None:
        where = f" ({err.filename} -> {err.filename2})"
    verb = "write" if err.errno in _WRITE_ERRNOS else "find" if err.errno == errno.ENOENT else "access"
    return f"cannot {verb}{where}: {why}{f' [{name}]' if name else ''}; {todo}"


def _yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" ({mark.name}, line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"cannot parse YAML{where}: {problem}; fix the syntax there (indentation, ':' after keys, quotes)"


def describe_error(err: BaseException) -> str:
    """`<what> (<file>): <why>; <what to do>` on one line."""
    if isinstance(err, OSError) and err.errno is not None:
        return _os_error(err)
    if isinstance(err, yaml.YAMLError):
        return _yaml_error(err)
    if isinstance(err, (pickle.UnpicklingError, EOFError)):
        return (f"cannot unpickle a file: {err or 'it ends early'}; the file (a .bin pack or checkpoint) is "
                "truncated or not what it claims to be: copy or regenerate it")
    if isinstance(err, UnicodeDecodeError):
        return f"cannot decode text: {err}; the file is not UTF-8 text (wrong file given?)"
    if isinstance(err, MemoryError):
        return "out of memory; use fewer workers, a smaller batch or a machine with more memory"
    return " ".join(str(err).split())  # an OSError raised by megaface with its own message
