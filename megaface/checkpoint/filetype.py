"""What a file is, from its first bytes: for errors that say "X is a verification pack, not a backbone".

A reader that is handed the wrong file (`convert onnx val.bin`, a .json where a checkpoint belongs) names
what it found and what it expected, instead of passing the file to torch.load and printing its
weights_only message.
"""

from __future__ import annotations

import os
from pathlib import Path

TORCH_ZIP = "a torch file"
TORCH_LEGACY = "a torch file (legacy format)"
SAFETENSORS = "a safetensors file"
WEIGHT_FILES = (TORCH_ZIP, TORCH_LEGACY, SAFETENSORS)

_HEAD = 64
# torch's legacy (pre-1.6) files: pickle protocol 2, then the magic number 0x1950a86a20f9469cfc6c
_TORCH_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")
_RECORDIO_MAGIC = bytes.fromhex("0a23d7ce")


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in (9, 10, 13) for c in head)


def _kind_of_text(path: Path, head: bytes) -> str:
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "a JSON text file"
    if path.suffix in (".yaml", ".yml"):
        return "a YAML text file"
    if path.suffix == ".idx" or (b"\t" in text and text[:1].isdigit()):
        return "a RecordIO index (.idx text)"
    if path.name == "property":
        return "a pack's property file (classes,height,width)"
    return "a text file"


def describe_file(path: str | os.PathLike) -> str:
    """A few words saying what `path` is ('a JSON text file', 'a torch file', 'a .bin verification pack')."""
    path = Path(path)
    if path.is_dir():
        return "a directory"
    if not path.exists():
        return "missing"
    with open(path, "rb") as fh:
        head = fh.read(_HEAD)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return TORCH_ZIP if path.suffix not in (".zip", ".npz") else "a zip archive"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return TORCH_LEGACY
    if len(head) > 9 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < (100 << 20):
        return SAFETENSORS
    if head.startswith(_RECORDIO_MAGIC):
        return "a RecordIO pack (.rec)"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head[:1] == b"\x80" and (path.suffix == ".bin" or b"\xff\xd8\xff" in head):
        return "a .bin verification pack (pickled images and pairs)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    if path.suffix == ".onnx":
        return "an ONNX model"
    if _looks_like_text(head):
        return _kind_of_text(path, head)
    return "a binary file of unknown type"


def require_weight_file(path: str | os.PathLike, expected: str) -> None:
    """Raise ValueError naming what `path` is unless it is a torch or safetensors file."""
    found = describe_file(path)
    if found not in WEIGHT_FILES:
        raise ValueError(f"{path} is {found}, not {expected}; give a megaface output dir, checkpoint tag dir "
                         "or backbone .pt/.safetensors file")
