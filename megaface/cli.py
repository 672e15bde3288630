"""The `megaface` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing `main(argv: list[str]) -> int`; it is imported
only when chosen, so `megaface pack --help` does not pay for DeepSpeed's import.
"""

from __future__ import annotations

import importlib
import os
import sys

from megaface.cli_errors import EXPECTED_ERRORS, describe_error

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("megaface.train.cli", "main", "train a backbone + model-parallel FC7 with DeepSpeed"),
    "eval": ("megaface.eval.cli", "main_eval", "verification on .bin packs (LFW, CFP-FP, AgeDB-30, ...)"),
    "eval-ijb": ("megaface.eval.cli", "main_ijb", "IJB-B/C 1:1 template verification (TAR@FAR)"),
    "eval-ident": ("megaface.eval.cli", "main_ident", "MegaFace-style 1:N identification (rank-1, CMC)"),
    "embed": ("megaface.eval.cli", "main_embed", "embeddings for an image folder, a RecordIO pack or a .bin"),
    "pack": ("megaface.data.cli", "main", "write RecordIO training packs, .bin verification packs, synthetic data"),
    "convert": ("megaface.convert", "main", "inspect, consolidate, reshard, ONNX and InsightFace interop"),
}


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
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        # Errors a user can cause carry their own explanation (value, constraint, fix): print it alone.
        # MEGAFACE_TRACEBACK=1 shows where it came from.
        if os.environ.get("MEGAFACE_TRACEBACK"):
            raise
        if isinstance(err, OSError) and err.errno is not None:  # raised by the OS, not by megaface
            print(f"megaface {name}: error: {describe_error(err)}", file=sys.stderr)
            return 1
        print(f"megaface {name}: error: {err}", file=sys.stderr)
        return 2
    except EXPECTED_ERRORS as err:
        # the environment (disk, permissions, limits) or a damaged input file: one line, exit 1
        if os.environ.get("MEGAFACE_TRACEBACK"):
            raise
        print(f"megaface {name}: error: {describe_error(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
