"""The `megaface` command line: one entry point, one module per subcommand, and the one place that prints
errors and picks exit codes.

Each subcommand lives in its own module exposing `main(argv: list[str]) -> int`; it is imported
only when chosen, so `megaface pack --help` does not pay for DeepSpeed's import. Subcommands raise; this
module turns what they raise into one line on stderr and an exit status:

    EXIT_USER_ERROR (2)   a value, path or file a user can fix (ValueError, FileNotFoundError, ...): the
                          message carries the value, the constraint and the fix
    EXIT_ENVIRONMENT (1)  the environment (disk, permissions, limits) or a damaged input file
                          (`EXPECTED_ERRORS`, described by `describe_error`)
Anything else is a bug in megaface and keeps its traceback. MEGAFACE_TRACEBACK=1 shows the traceback of
every error.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import pickle
import signal
import sys
import warnings
from typing import Any

import yaml

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT = 1

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("megaface.train.cli", "main", "train a backbone + model-parallel FC7 with DeepSpeed"),
    "eval": ("megaface.eval.cli", "main_eval", "verification on .bin packs (LFW, CFP-FP, AgeDB-30, ...)"),
    "eval-ijb": ("megaface.eval.cli", "main_ijb", "IJB-B/C 1:1 template verification (TAR@FAR)"),
    "eval-ident": ("megaface.eval.cli", "main_ident", "MegaFace-style 1:N identification (rank-1, CMC)"),
    "embed": ("megaface.eval.cli", "main_embed", "embeddings for an image folder, a RecordIO pack or a .bin"),
    "clean": ("megaface.eval.cli", "main_clean", "drop samples far from their dominant sub-center; a cleaned pack"),
    "pack": ("megaface.data.cli", "main", "write RecordIO training packs, .bin verification packs, synthetic data"),
    "align": ("megaface.data.align", "main", "5-point landmarks -> aligned 112x112 ArcFace crops (folder or pack)"),
    "convert": ("megaface.convert", "main", "inspect, consolidate, reshard, ONNX and InsightFace interop"),
    "models": ("megaface.models.cli", "main", "the networks model.network accepts; parameters and multiply-adds"),
    "summary": ("megaface.train.summary", "main", "what a finished run produced: best accuracy, model, next command"),
}
NESTED_COMMANDS = ("convert",)
# subcommands served by a module above their command's own layer: `pack preview` reads the experiment config
ROUTES: dict[tuple[str, str], tuple[str, str]] = {("pack", "preview"): ("megaface.train.preview", "main")}  # their errors name the subcommand too: `megaface convert inspect: error: ...`



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
    space = _space_left(err) if err.errno in _WRITE_ERRNOS else ""
    return f"cannot {verb}{where}: {why}{f' [{name}]' if name else ''}{space}; {todo}"


def _space_left(err: OSError) -> str:
    """` (1.2 GB free on /mnt/out, file-size limit 4 KB)`: what the filesystem and the limits allow now."""
    import resource
    import shutil
    from pathlib import Path

    parts = []
    folder = Path(str(err.filename)).absolute().parent if err.filename is not None else None
    while folder is not None and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder is not None:
        with contextlib.suppress(OSError):
            parts.append(f"{_bytes(shutil.disk_usage(folder).free)} free on {folder}")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        parts.append(f"file-size limit {_bytes(limit)}")
    return f" ({', '.join(parts)})" if parts else ""


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


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


# optional packages -> the pyproject extra that installs them
OPTIONAL_EXTRAS: dict[str, str] = {"onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx-dynamo",
                                   "matplotlib": "plot", "mpi4py": "mpi"}


def _missing_extra(err: ModuleNotFoundError) -> str | None:
    """The line for an optional package that is not installed (None for any other missing module: a bug)."""
    root = (err.name or "").split(".")[0]
    if root not in OPTIONAL_EXTRAS:
        return None
    message = str(err.msg) if err.msg and not str(err.msg).startswith("No module named") else ""
    why = f" ({message})" if message and "halted" not in message else ""
    return (f"the optional package '{root}' is not installed{why}: pip install 'megaface[{OPTIONAL_EXTRAS[root]}]'")


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: megaface <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`megaface <command> --help` for the options of one command."]
    return "\n".join(lines)


def _take_local_rank(args: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that `deepspeed --module megaface ...` puts before the subcommand.

    The rank is also in the LOCAL_RANK environment variable, which megaface reads; the flag is kept in the
    environment only when the launcher did not set it.
    """
    rest = list(args)
    while rest and rest[0].replace("-", "_").startswith("__local_rank"):
        flag = rest.pop(0)
        value = flag.split("=", 1)[1] if "=" in flag else (rest.pop(0) if rest else "")
        if not value.isdigit():
            raise SystemExit(f"megaface: {flag!r} needs an integer local rank (got {value!r})")
        os.environ.setdefault("LOCAL_RANK", value)
    return rest


def main(argv: list[str] | None = None) -> int:
    args = _take_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from megaface import __version__

        print(f"megaface {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        print(f"megaface: unknown command '{name}'{hint}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    module_name, func_name, _ = COMMANDS[name]
    warnings.formatwarning = _warning_line(name)
    func_args = rest
    if rest and (name, rest[0]) in ROUTES:
        (module_name, func_name), func_args = ROUTES[(name, rest[0])], rest[1:]
    from megaface import fileio  # (light: no torch)

    placed_before = len(fileio.PLACED)
    try:
        with _stop_on_sigterm():
            func = getattr(importlib.import_module(module_name), func_name)
            return int(func(func_args) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM through _stop_on_sigterm (train has its own handlers)
        if os.environ.get("MEGAFACE_TRACEBACK"):
            raise
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        hint = STOP_HINTS.get((name, rest[0] if rest else ""), STOP_HINTS[("", "")])
        placed = [p for p in fileio.PLACED[placed_before:] if p.exists()]  # not a staged part, removed since
        if placed:  # the stop came after the output was in place, whole
            hint = f"{placed[-1]} was already complete (written aside, then renamed into place whole)"
        print(f"megaface {_command_name(name, rest)}: stopped by {signal.Signals(signum).name}; {hint}",
              file=sys.stderr, flush=True)
        return 128 + signum
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        # Errors a user can cause carry their own explanation (value, constraint, fix): print it alone.
        if os.environ.get("MEGAFACE_TRACEBACK"):
            raise
        if isinstance(err, OSError) and err.errno is not None:  # raised by the OS, not by megaface
            _print_error(name, rest, describe_error(err))
            return EXIT_ENVIRONMENT
        _print_error(name, rest, str(err))
        return EXIT_USER_ERROR
    except ModuleNotFoundError as err:
        extra = _missing_extra(err)
        if extra is None or os.environ.get("MEGAFACE_TRACEBACK"):
            raise
        _print_error(name, rest, extra)
        return EXIT_ENVIRONMENT
    except EXPECTED_ERRORS as err:
        # the environment (disk, permissions, limits) or a damaged input file
        if os.environ.get("MEGAFACE_TRACEBACK"):
            raise
        _print_error(name, rest, describe_error(err))
        return EXIT_ENVIRONMENT


def _warning_line(name: str) -> Any:
    """`warnings.formatwarning` for the command line: `megaface <command>: warning: <message>`, one line."""
    def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                       line: str | None = None) -> str:
        return f"megaface {name}: warning: {' '.join(str(message).split())}\n"
    return format_warning


class Stopped(KeyboardInterrupt):
    """SIGTERM (a batch system's stop, `kill`) raised in the main thread, so that every `with` block of the
    command cleans up as after Ctrl-C: temporaries removed, outputs renamed into place only when complete."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_HINTS = {
    ("", ""): "outputs appear only when complete, so nothing half-written was left: rerun the command",
    ("pack", "rec"): "the chunks packed before are kept: rerun with --resume to continue",
}
"""The line's advice after a stop, by (command, subcommand)."""


@contextlib.contextmanager
def _stop_on_sigterm() -> Any:
    """SIGTERM raises `Stopped` in this process for the length of the command. A forked child (a loader or
    pack worker) that gets it ends as before: by the signal, quietly; its parent reports."""
    pid = os.getpid()

    def handle(signum: int, frame: Any) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (megaface.cli.main called from a thread): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _command_name(name: str, rest: list[str]) -> str:
    if rest and (name in NESTED_COMMANDS or (name, rest[0]) in ROUTES) and not rest[0].startswith("-"):
        return f"{name} {rest[0]}"
    return name


def _print_error(name: str, rest: list[str], message: str) -> None:
    """`[rank R] megaface <command> [<subcommand>]: error: <message>` on stderr, one line.

    Under a launcher every rank prints its own line (the prefix says which), so no rank fails silently.
    """
    name = _command_name(name, rest)
    world = os.environ.get("WORLD_SIZE", "1")
    prefix = f"[rank {os.environ['RANK']}] " if world.isdigit() and int(world) > 1 and "RANK" in os.environ else ""
    print(f"{prefix}megaface {name}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
