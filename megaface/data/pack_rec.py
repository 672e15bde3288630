"""`megaface pack rec`: images -> InsightFace pack(s), in worker processes, resumable, byte-deterministic.

Workers read, decode (verify: every image decodes and has the first image's size), optionally re-encode as
JPEG, and frame whole RecordIO records (keys are known from the image order) into a staged file per chunk;
the parent only appends those bytes (a copy inside the kernel: megaface.data.pack_workers) and the index
lines, chunk by chunk in list order, so the output is the same for any worker count and chunk split and the
same as `PackWriter` writes. With ``shards > 1`` the classes are split into contiguous ranges of about
equal image counts, one complete pack per range, and a ``shards.json`` lists them (megaface.data.sharded).
Progress of the chunks is journaled (megaface.data.pack_journal): a killed run continues with ``resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megaface.data.decode import CorruptImageError, decode_image, encode_jpeg
from megaface.data.image_list import ImageList, PathTable
from megaface.data.pack_journal import Journal, fingerprint, partial_dir
from megaface.data.pack_workers import ChunkWorkers, append_range, write_records
from megaface.data.recordio import encode_record, pack_payload
from megaface.data.sharded import MANIFEST_NAME, manifest_text, shard_name
from megaface.fileio import output_error, replace_dir
from megaface.utils.progress import Progress
from megaface.vocab import ProgressMode

DEFAULT_CHUNK = 2000
"""Images per chunk at most: the unit of work of a worker and of the resume journal (smaller towards the end
of a job with several workers: `chunk_bounds`)."""
MIN_CHUNK = 64
"""The smallest chunk `chunk_bounds` makes (unless --chunk-size is smaller): ~15 ms of a worker's time."""
STAGING = ".chunks"
"""The folder of the partial pack where workers stage their chunks' records (megaface.data.pack_workers)."""


@dataclass(frozen=True)
class PackOptions:
    """What changes the bytes of a pack (the worker count and chunk size do not)."""

    verify: bool = True
    """Decode every image (a corrupt or differently sized image stops the pack, naming the file)."""
    quality: int | None = None
    """Re-encode every image as JPEG at this quality; None stores the files' bytes as they are."""
    shards: int = 1
    """1: one pack; K > 1: K packs of contiguous class ranges plus shards.json."""


def default_workers() -> int:
    """The cores this process may run on (taskset / cgroup cpusets shrink it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class _Chunk:
    """One worker task: images [start, start + len(paths)) of the list, with their shard-local label and key."""

    paths: PathTable
    labels: np.ndarray
    keys: np.ndarray
    size: tuple[int, int]
    verify: bool
    quality: int | None
    source: str


def encode_chunk(chunk: _Chunk) -> list[bytes]:
    """Worker: the physical RecordIO bytes of each image record of `chunk`, in order."""
    out = []
    for path, label, key in zip(chunk.paths, chunk.labels, chunk.keys, strict=True):
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"{path}: cannot read the image ({err.strerror}; listed in {chunk.source})") from None
        if chunk.verify or chunk.quality is not None:
            image = _checked(data, path, chunk.size)
            if chunk.quality is not None:
                data = encode_jpeg(image, chunk.quality)
        out.append(encode_record(pack_payload(float(label), data, id=int(key))))
    return out


def index_lines(keys: np.ndarray, offsets: np.ndarray) -> bytes:
    """The .idx lines ``key<TAB>offset`` of one chunk (one %-format over the chunk: half the time of an
    f-string per line, and it is the parent's time, which the workers wait on)."""
    pairs = np.empty(2 * len(keys), dtype=np.int64)
    pairs[0::2], pairs[1::2] = keys, offsets
    return (("%d\t%d\n" * len(keys)) % tuple(pairs.tolist())).encode()


def _checked(data: bytes, path: str, size: tuple[int, int]) -> np.ndarray:
    try:
        image = decode_image(data)
    except CorruptImageError as err:
        raise CorruptImageError(f"{path}: {err}; remove or replace the file") from None
    if image.shape[:2] != size:
        raise ValueError(f"{path}: image is {image.shape[0]}x{image.shape[1]}, the first image was "
                         f"{size[0]}x{size[1]}; a pack holds aligned images of one size")
    return image


class _Layout:
    """Where each image goes: shard, shard-local label and key (keys 1..n; key 0 is the header record)."""

    def __init__(self, labels: np.ndarray, num_classes: int, shards: int) -> None:
        if not 1 <= shards <= num_classes:
            raise ValueError(f"--shards {shards}: must be between 1 and the {num_classes} classes (a shard holds "
                             "whole classes)")
        counts = np.bincount(labels, minlength=num_classes)
        ends = np.cumsum(counts)
        bounds = [0]
        for k in range(1, shards):  # first class of shard k: where the image count passes k/K of the total
            first = int(np.searchsorted(ends, k * ends[-1] / shards, side="left")) + 1
            bounds.append(min(max(first, bounds[-1] + 1), num_classes - (shards - k)))
        bounds.append(num_classes)
        self.class_bounds = bounds
        self.image_bounds = [0] + [int(ends[b - 1]) for b in bounds[1:]]
        self.labels, self.counts = labels, counts

    def place(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, shard-local label, key) of images [start, stop); per chunk, not for all 42M at once."""
        index = np.arange(start, stop)
        shard = np.searchsorted(np.asarray(self.image_bounds[1:]), index, side="right")
        local = self.labels[start:stop] - np.asarray(self.class_bounds)[shard]
        return shard, local, index - np.asarray(self.image_bounds)[shard] + 1

    def identity_ranges(self, k: int) -> list[tuple[int, int]]:
        """[img_start, img_end) keys of each class of shard k."""
        counts = self.counts[self.class_bounds[k]:self.class_bounds[k + 1]]
        ends = np.cumsum(counts) + 1
        return [(int(e - c), int(e)) for c, e in zip(counts, ends, strict=True)]


def _in_process(chunks: Iterator[_Chunk]) -> Iterator[tuple[list[bytes], array]]:
    for chunk in chunks:
        records = encode_chunk(chunk)
        yield records, array("q", map(len, records))


def chunk_bounds(done: int, total: int, chunk_size: int, workers: int) -> Iterator[tuple[int, int]]:
    """[start, stop) of each chunk after the `done` images. With several workers the chunks shrink towards the
    end (a quarter of what is left over two workers, at least MIN_CHUNK), so that the workers finish
    together; any split gives the same bytes."""
    start = done
    while start < total:
        size = chunk_size
        if workers > 1:
            size = min(chunk_size, max(-(-(total - start) // (2 * workers)), MIN_CHUNK))
        yield start, min(start + size, total)
        start += size


def pack_images(images: ImageList, output: str | os.PathLike, options: PackOptions = PackOptions(),
                workers: int | None = None, resume: bool = False, overwrite: bool = False,
                chunk_size: int = DEFAULT_CHUNK, progress: ProgressMode = "auto") -> dict:
    """Pack `images` into `output` (see the module docstring); returns a summary."""
    output = Path(output)
    workers = default_workers() if workers is None else workers
    _check_arguments(workers, chunk_size, options, output, overwrite)
    layout = _Layout(images.labels, images.num_classes, options.shards)
    size = _first_size(images)
    settings = {**asdict(options), "image_size": list(size), "format": 1}
    fp = fingerprint(images.paths, images.labels, settings)
    journal = _open_journal(output, images, layout, fp, settings, resume, overwrite)
    resumed_from = journal.done
    try:
        with Progress("pack", len(images), "images", mode=progress, initial=journal.done) as bar:
            if resumed_from:
                bar.write(f"pack: resuming {journal.directory} at image {resumed_from} of {len(images)}")
            _write_chunks(images, layout, options, size, journal, workers, chunk_size, bar)
        written = _finish(journal, layout, size, options.shards)
    except BaseException as err:  # noqa: BLE001  (always re-raised; a kill or Ctrl-C keeps the partial pack)
        raise _failed(err, journal, output) from None
    replace_dir(journal.directory, output)
    return {"images": len(images), "classes": images.num_classes, "image_size": list(size), "shards": options.shards,
            "workers": workers, "resumed_from": resumed_from, "bytes": written, "output": str(output)}


def _check_arguments(workers: int, chunk_size: int, options: PackOptions, output: Path, overwrite: bool) -> None:
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1")
    if chunk_size < 1:
        raise ValueError(f"--chunk-size {chunk_size}: must be >= 1")
    if options.quality is not None and not 1 <= options.quality <= 100:
        raise ValueError(f"--quality {options.quality}: JPEG quality must be 1..100")
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"output {output} exists and is not empty; pass --force to replace it")


def _first_size(images: ImageList) -> tuple[int, int]:
    """The pack's image size: the first image's (decoded in the parent even with verify off)."""
    if not images.paths:
        raise ValueError(f"{images.source}: no images to pack")
    path = images.paths[0]
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read the image ({err.strerror}; listed in {images.source})") from None
    try:
        shape = decode_image(data).shape
    except CorruptImageError as err:
        raise CorruptImageError(f"{path}: {err}; remove or replace the file") from None
    return int(shape[0]), int(shape[1])


def _file_names(shards: int) -> list[tuple[str, str]]:
    """(rec, idx) paths relative to the pack directory, per shard."""
    if shards == 1:
        return [("train.rec", "train.idx")]
    return [(f"{shard_name(k)}/train.rec", f"{shard_name(k)}/train.idx") for k in range(shards)]


def _open_journal(output: Path, images: ImageList, layout: _Layout, fp: str, settings: dict, resume: bool,
                  overwrite: bool) -> Journal:
    tmp = partial_dir(output)
    if tmp.exists() and not overwrite:
        if not resume:
            raise FileExistsError(f"{tmp} holds an interrupted pack of {output}; pass --resume to continue it "
                                  "or --force to start over")
        journal = Journal.open(tmp)
        if journal is not None and journal.header["fingerprint"] == fp:
            journal.truncate_files()
            return journal
        if journal is not None:
            journal.close()
            raise ValueError(f"{tmp} was packed from another image list or with other options "
                             f"({json.dumps(journal.header.get('settings'))}); pass --force to start over")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    names = _file_names(len(layout.class_bounds) - 1)
    header = encode_record(pack_payload([0.0, 0.0], b""))  # patched with the identity range at the end
    sizes = {}
    for rec, idx in names:
        (tmp / rec).parent.mkdir(exist_ok=True)
        (tmp / rec).write_bytes(header)
        (tmp / idx).write_bytes(b"0\t0\n")
        sizes.update({rec: len(header), idx: 4})
    return Journal.create(tmp, {"fingerprint": fp, "images": len(images), "settings": settings,
                                "source": images.source}, sizes)


def _write_chunks(images: ImageList, layout: _Layout, options: PackOptions, size: tuple[int, int],
                  journal: Journal, workers: int, chunk_size: int, bar: Progress) -> None:
    names = _file_names(options.shards)
    sizes = dict(journal.sizes)

    def chunks() -> Iterator[_Chunk]:
        for start, stop in chunk_bounds(journal.done, len(images), chunk_size, workers):
            _, local, keys = layout.place(start, stop)
            yield _Chunk(images.paths.section(start, stop), local, keys, size, options.verify,
                         options.quality, images.source)

    files = [(os.open(journal.directory / rec, os.O_WRONLY), os.open(journal.directory / idx, os.O_WRONLY))
             for rec, idx in names]
    try:
        for rec, idx in files:
            os.lseek(rec, 0, os.SEEK_END)
            os.lseek(idx, 0, os.SEEK_END)
        with contextlib.ExitStack() as stack:
            if workers == 1:
                results: Iterator[tuple[list[bytes] | Path, array]] = _in_process(chunks())
            else:
                pool = stack.enter_context(ChunkWorkers(encode_chunk, workers, journal.directory / STAGING,
                                                        window=4 * workers))
                results = pool.results(chunks())
            done = journal.done
            for records, lengths in results:
                _append_chunk(records, np.asarray(lengths), layout.place(done, done + len(lengths)), names,
                              files, sizes)
                done += len(lengths)
                journal.commit(done, sizes)
                bar.update(len(lengths))
    finally:
        for rec, idx in files:
            os.close(rec)
            os.close(idx)


def _append_chunk(records: list[bytes] | Path, lengths: np.ndarray, placed: tuple[np.ndarray, ...],
                  names: list[tuple[str, str]], files: list[tuple[int, int]], sizes: dict[str, int]) -> None:
    """A chunk's records (in memory, or staged by a worker) and index lines appended to their shards."""
    shard_of, _, keys = placed
    ends = np.cumsum(lengths)
    staged = os.open(records, os.O_RDONLY) if isinstance(records, Path) else None
    try:
        for k in np.unique(shard_of).tolist():  # a chunk's images are contiguous within each shard
            a, b = np.searchsorted(shard_of, k, side="left"), np.searchsorted(shard_of, k, side="right")
            start, stop = (int(ends[a - 1]) if a else 0), int(ends[b - 1])
            (rec_name, idx_name), (rec, idx) = names[k], files[k]
            offsets = sizes[rec_name] - start + np.concatenate([[start], ends[a:b - 1]])
            lines = index_lines(keys[a:b], offsets)
            if staged is None:
                assert not isinstance(records, Path)
                write_records(rec, records[a:b])
            else:
                append_range(staged, rec, start, stop - start)
            write_records(idx, [lines])
            sizes[rec_name] += stop - start
            sizes[idx_name] += len(lines)
    finally:
        if staged is not None:
            os.close(staged)


def _finish(journal: Journal, layout: _Layout, size: tuple[int, int], shards: int) -> int:
    """Identity records, the patched header, property (and shards.json); returns the bytes of the pack."""
    entries, written = [], 0
    for k, (rec_name, idx_name) in enumerate(_file_names(shards)):
        ranges = layout.identity_ranges(k)
        start = layout.image_bounds[k + 1] - layout.image_bounds[k] + 1
        with open(journal.directory / rec_name, "r+b") as rec, open(journal.directory / idx_name, "ab") as idx:
            rec.seek(0, os.SEEK_END)
            for key, (a, b) in enumerate(ranges, start):
                idx.write(f"{key}\t{rec.tell()}\n".encode())
                rec.write(encode_record(pack_payload([float(a), float(b)], b"", id=key)))
            rec.seek(0)
            rec.write(encode_record(pack_payload([float(start), float(start + len(ranges))], b"")))
        prop = (journal.directory / rec_name).parent / "property"
        prop.write_text(f"{len(ranges)},{size[0]},{size[1]}\n")
        written += sum((journal.directory / n).stat().st_size for n in (rec_name, idx_name)) + prop.stat().st_size
        entries.append({"path": shard_name(k), "class_start": layout.class_bounds[k], "classes": len(ranges),
                        "images": start - 1})
    if shards > 1:
        text = manifest_text(layout.class_bounds[-1], (size[0], size[1]), entries)
        (journal.directory / MANIFEST_NAME).write_text(text)
        written += len(text)
    shutil.rmtree(journal.directory / STAGING, ignore_errors=True)  # left by a killed run resumed with 1 worker
    journal.remove()
    return written


def _failed(err: BaseException, journal: Journal, output: Path) -> BaseException:
    """The error to raise; a partial pack with complete chunks is kept for --resume, else removed."""
    journal.close()
    tmp = journal.directory
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return err
    if journal.done == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(err, OSError) and err.errno is not None:
        return output_error(err, tmp, output)  # a write failed (full disk): name the output
    if journal.done == 0 or not isinstance(err, (ValueError, OSError)) or err.args == ():
        return err
    kept = type(err)(f"{err}; the {journal.done} images packed before it are kept in {tmp}: fix the cause and "
                     "rerun with --resume (or --force to start over)")
    return kept
