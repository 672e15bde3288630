"""``megaface pack ofrecord``: write OFRecord directories from a RecordIO pack, an image folder or a .bin.

  RecordIO pack / image folder -> training parts   (records: encoded + label)
  .bin verification pack        -> verification parts (records: encoded + issame, image i holds issame[i // 2])

Records are split over ``--parts`` files in order (part p holds records [p*N/P, (p+1)*N/P)), so a
verification set read back part by part keeps its pair order. Image bytes are stored as they are.
The directory is written aside and renamed into place at the end: a failed run leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from megaface.data.ofrecord import encode_record, frame, part_name
from megaface.fileio import atomic_output_dir
from megaface.utils.progress import Progress
from megaface.vocab import ProgressMode


def write_parts(output: str | os.PathLike, count: int, records: Iterator[bytes], parts: int = 1,
                suffix_length: int | None = 5, overwrite: bool = False) -> list[Path]:
    """Write `count` serialized records into `parts` part files under `output`; returns the part paths."""
    output = Path(output)
    if parts < 1:
        raise ValueError(f"--parts {parts} must be >= 1")
    if count < parts:
        raise ValueError(f"--parts {parts} is more than the {count} record(s) to write; every part needs a record")
    replacing = output.exists()
    if replacing and not overwrite:
        raise FileExistsError(f"output {output} exists; pass --force to replace it")
    # A replacement is written beside the old output and swapped in only once complete, so a failure (a bad
    # source record, a full disk) leaves the previous output as it was.
    staging = output.with_name(f".{output.name}.new") if replacing else output
    if replacing and staging.exists():  # left by an interrupted earlier replacement
        shutil.rmtree(staging)
    with atomic_output_dir(staging) as tmp:
        written = 0
        for p in range(parts):
            stop = (p + 1) * count // parts
            with open(tmp / part_name(p, suffix_length), "wb") as f:
                while written < stop:
                    payload = next(records, None)
                    if payload is None:
                        raise ValueError(f"write_parts: the source ran out after {written} of {count} records")
                    f.write(frame(payload))
                    written += 1
    if replacing:
        old = output.with_name(f".{output.name}.old")
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return [output / part_name(p, suffix_length) for p in range(parts)]


def _counted(bar: Progress, record: bytes) -> bytes:
    bar.update(1)
    return record


def _training_source(path: Path) -> tuple[Any, str]:
    from megaface.data.datasets import FolderDataset
    from megaface.data.packs import open_pack

    if (path / "train.rec").is_file():
        return open_pack(path), "recordio"
    return FolderDataset(path), "folder"


def pack_ofrecord(source: str | os.PathLike, output: str | os.PathLike, parts: int = 1,
                  suffix_length: int | None = 5, overwrite: bool = False, progress: ProgressMode = "off") -> dict:
    """RecordIO pack dir, image folder or .bin -> OFRecord directory. Returns a summary.

    `progress`: console progress (auto: a bar on a terminal, plain lines otherwise; off: none)."""
    from megaface.data.bin_pack import load_bin

    source = Path(source)
    if source.is_file():
        images, issame = load_bin(source)
        with Progress("pack", len(images), "images", mode=progress) as bar:
            records = (_counted(bar, encode_record({"encoded": image, "issame": int(issame[i // 2])}))
                       for i, image in enumerate(images))
            write_parts(output, len(images), records, parts, suffix_length, overwrite)
        return {"kind": "verification", "pairs": len(issame), "images": len(images), "parts": parts,
                "output": str(output)}
    if not source.is_dir():
        raise FileNotFoundError(f"source {source} not found; give a RecordIO pack directory (train.rec/.idx/"
                                "property), an image folder root/<identity>/*.jpg or a .bin verification pack")
    dataset, kind = _training_source(source)

    def training_records() -> Iterator[bytes]:
        for i in range(len(dataset)):
            label, image = dataset[i]
            yield _counted(bar, encode_record({"encoded": image, "label": int(label)}))

    with Progress("pack", len(dataset), "images", mode=progress) as bar:
        write_parts(output, len(dataset), training_records(), parts, suffix_length, overwrite)
    return {"kind": "training", "source": kind, "images": len(dataset), "classes": int(dataset.num_classes),
            "parts": parts, "output": str(output)}
