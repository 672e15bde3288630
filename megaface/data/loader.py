"""TrainLoader: per-rank shard of each global batch, deterministic shuffle/flip, exact resume.

One epoch is a permutation of all N samples drawn from ``(seed, epoch)``, identical on every rank.
Global batch g covers permutation positions ``[g*B*W, (g+1)*B*W)``; rank r takes the r-th slice of B,
so each sample is used exactly once per epoch across ranks (B = `batch_size`, the per-rank batch;
W = `world_size`). With ``drop_last=False`` the last, short global batch is split as evenly as possible
(rank r gets ``m // W + (r < m % W)`` samples, possibly 0): ranks then see unequal batch sizes.

The horizontal flip of a sample is a function of ``(seed, epoch, dataset index)``, so it does not depend
on the world size, the worker count or a resume. ``state_dict()`` records (epoch, samples consumed in
the epoch); after ``load_state_dict`` the loader yields exactly the batches the uninterrupted run would.

Decoding runs in worker processes (torch DataLoader over whole batches; one task per batch keeps the IPC per
image small); workers hand back uint8 NCHW, flipped in the same copy. With ``on_device=True`` (what training
uses) the loader yields `RawBatch`es: the uint8 images (pinned when ``pin_memory``) and, when augmentations
are on, each sample's random numbers; given a ``device`` it copies them there one batch ahead, and
`megaface.data.augment.prepare_batch` augments and normalises on the training device. Otherwise
(``on_device=False``, the former path, kept for tools and as the benchmark baseline) this process normalises
to float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from megaface.data.augment import Augment, DeviceCopy, RawBatch, sample_uniforms
from megaface.data.datasets import dataset_where
from megaface.data.decode import NORMALIZE_MODES, CorruptImageError, decode_image_checked, normalize_nchw
from megaface.data.device_decode import Decoder, check_input_path, encode_batch, jpeg_header, nvjpeg_decoder

STATE_FORMAT = "megaface.loader.v1"


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    dtype = np.int32 if num_samples < 2**31 else np.int64
    return np.random.default_rng((seed, epoch, 0)).permutation(num_samples).astype(dtype)


def epoch_flips(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """flip[i] for dataset index i (bool [N])."""
    return np.random.default_rng((seed, epoch, 1)).random(num_samples, dtype=np.float32) < 0.5


class DataError(ValueError):
    """A training record that cannot be read: the message names the file, the record and the reason."""


@dataclass(frozen=True)
class _WorkerFailure:
    """What a worker returns instead of a batch when a record fails (raised again in the main process)."""

    corrupt_image: bool
    message: str

    def error(self) -> ValueError:
        return CorruptImageError(self.message) if self.corrupt_image else DataError(self.message)


def _located(where: str, err: BaseException) -> str:
    """One line: the record's location (unless the message already names the file) and the reason."""
    message = " ".join(str(err).split()) or type(err).__name__
    file = where.split(":", 1)[0]
    return message if file in message else f"{where}: {message}"


class _BatchTask(torch.utils.data.Dataset):
    """Map-style dataset whose item is a whole batch.

    (indices, flips, epoch) -> (uint8 NCHW flipped, labels, skipped, uniforms, damaged): `uniforms` are the
    augmentations' random numbers per position, after corrupt images were replaced (`augment.sample_uniforms`;
    None when no augmentation is on); `damaged` the (location, libjpeg warning) of each image that decoded only
    with warnings (unless strict_decode)."""

    def __init__(self, dataset, skip_corrupt: bool, seed: int = 0, augment: Augment | None = None,
                 strict_decode: bool = False, decode: str = "cpu"):
        self.dataset, self.skip_corrupt, self.strict_decode = dataset, skip_corrupt, strict_decode
        self.seed, self.augment, self.decode = seed, augment, decode

    def __len__(self) -> int:  # unused: items are index arrays from the sampler
        return 0

    def _load(self, i: int) -> tuple[int, np.ndarray | _Jpeg | None, str | None]:
        try:
            label, item = self.dataset[int(i)]
        except (ValueError, OSError, EOFError) as err:  # a damaged record, an unreadable file
            raise DataError(_located(dataset_where(self.dataset, int(i)), err)) from None
        num_classes = getattr(self.dataset, "num_classes", None)
        if num_classes is not None and not 0 <= int(label) < int(num_classes):  # once per record, on the host
            raise DataError(f"{dataset_where(self.dataset, int(i))}: label {label} is outside [0, {num_classes}) "
                            "(the data's class count); fix the labels or the pack's class count")
        if isinstance(item, np.ndarray) and item.ndim == 3:
            return label, item, None
        try:
            if self.decode == "gpu" and (size := jpeg_header(item)) is not None:
                return label, _Jpeg(item, size), None  # decoded on the device (megaface.data.device_decode)
            image, damage = decode_image_checked(item)
            if damage is not None and self.strict_decode:
                raise CorruptImageError(f"damaged JPEG data (libjpeg: {damage}) and data.strict_decode=true; "
                                        "repack the image, or set data.strict_decode=false to train on it anyway")
            return label, image, damage
        except CorruptImageError as err:
            if self.skip_corrupt:
                return label, None, None
            raise CorruptImageError(
                f"{dataset_where(self.dataset, int(i))}: {err}; set data.skip_corrupt=true to skip such images "
                "(each skip is counted in the log)"
            ) from None

    def __getitem__(self, task: tuple[np.ndarray, np.ndarray, int]):
        # In a worker process an exception would reach the main process wrapped in torch's multi-line
        # "Caught ... in DataLoader worker" text; ship the one-line message instead and raise it there.
        try:
            return self._batch(task)
        except (ValueError, OSError, EOFError) as err:
            if torch.utils.data.get_worker_info() is None:
                raise
            return _WorkerFailure(isinstance(err, CorruptImageError), " ".join(str(err).split()))

    def _batch(self, task: tuple[np.ndarray, np.ndarray, int]):
        indices, flips, epoch = task
        loaded = [self._load(i) for i in indices]
        good = [k for k, (_, im, _) in enumerate(loaded) if im is not None]
        skipped = [dataset_where(self.dataset, int(indices[k])) for k, (_, im, _) in enumerate(loaded) if im is None]
        damaged = [(dataset_where(self.dataset, int(indices[k])), why) for k, (_, _, why) in enumerate(loaded)
                   if why is not None]
        if skipped and not good:
            raise CorruptImageError(f"every image of a batch is corrupt, e.g. {skipped[0]}")
        # a corrupt image is replaced by a good one of the same batch so batch shapes stay equal on all ranks
        src = [k if loaded[k][1] is not None else good[k % len(good)] for k in range(len(loaded))]
        shapes = {tuple(im.shape[:2]) for _, im, _ in loaded if im is not None}  # arrays, or _Jpeg headers
        if len(shapes) > 1:
            raise ValueError(
                f"images of one batch differ in size {sorted(shapes)} "
                f"(e.g. {dataset_where(self.dataset, int(indices[0]))}); "
                "align/resize the data to one size (112x112)"
            )
        h, w = shapes.pop()[:2] if shapes else (112, 112)
        labels = torch.tensor([int(loaded[k][0]) for k in src], dtype=torch.int64)
        uniforms = None
        if self.augment is not None and self.augment.enabled:
            uniforms = torch.from_numpy(sample_uniforms(self.seed, epoch, np.asarray(indices)[src]))
        worker = torch.utils.data.get_worker_info() is not None
        if self.decode == "gpu":
            items = [loaded[k][1] for k in src]
            encoded = encode_batch([x.data if isinstance(x, _Jpeg) else x for x in items],  # type: ignore[misc]
                                   np.asarray(flips), (h, w),
                                   [dataset_where(self.dataset, int(indices[k])) for k in src], shared=worker)
            return encoded, labels, skipped, uniforms, damaged
        # uint8 NCHW crosses the process boundary (4x less than float32: measured ~30% more images/s
        # with one worker); flip and HWC->CHW happen in the one copy into the batch buffer
        images = torch.empty((len(src), 3, h, w), dtype=torch.uint8)
        if worker:
            images.share_memory_()  # filled in place: sending it to the main process then copies nothing
        buffer = images.numpy()
        for j, k in enumerate(src):
            image = loaded[k][1]
            assert isinstance(image, np.ndarray)  # src names good images only; JPEG bytes only under decode=gpu
            buffer[j] = (image[:, ::-1] if flips[j] else image).transpose(2, 0, 1)
        return images, labels, skipped, uniforms, damaged


@dataclass(frozen=True)
class _Jpeg:
    """A record's JPEG left compressed for the device (data.decode=gpu), with the size its header gives."""

    data: bytes
    shape: tuple[int, int]


class WorkerDied(DataError):
    """A loader worker process ended (a signal: the OOM killer's SIGKILL, a crash): the environment, exit 1."""


def _worker_signals(pool: Any) -> dict[int, int]:
    """{pid: signal number} of the pool's workers that a signal ended (torch's "exited unexpectedly" names none)."""
    processes = getattr(getattr(pool, "_iterator", None), "_workers", None) or []
    return {w.pid: -w.exitcode for w in processes if getattr(w, "exitcode", None) is not None and w.exitcode < 0}


def worker_death(err: BaseException, workers: int, signals: dict[int, int] | None = None) -> str | None:
    """One line for a loader worker's death, naming the worker, the signal and what to change; None for any
    other error. torch says "DataLoader worker (pid 123) is killed by signal: Killed." (from its SIGCHLD
    handler, wherever the main thread is) or "... exited unexpectedly"; `signals` ({pid: signal number}, from
    the pool's process objects) fills in the signal the second one does not name."""
    import re
    import signal

    text = " ".join(str(err).split())
    if not isinstance(err, RuntimeError) or "DataLoader worker" not in text:
        return None
    pids = re.search(r"pid\(?s?\)? ?(\d[\d, ]*\d|\d)", text)
    named = re.search(r"killed by signal: ([\w ]+?)\.?$", text)
    number: int | None = None
    if named is not None:
        number = next((s.value for s in signal.Signals if signal.strsignal(s) == named.group(1).strip()), None)
    elif signals:
        first = int(pids.group(1).split(",")[0]) if pids else None
        number = signals.get(first) if first in signals else next(iter(signals.values()))
    if number is not None:
        how = f"was killed by {signal.Signals(number).name} ({signal.strsignal(number)})"
    else:
        how = f"was killed by signal {named.group(1).strip()}" if named else "exited unexpectedly"
    oom = " (most likely the kernel's OOM killer, see `dmesg`)" if number in (None, signal.SIGKILL) else ""
    return (f"data loader worker (pid {pids.group(1) if pids else '?'}) {how}{oom}; lower data.workers (now "
            f"{workers}) or the batch size, or give the job more memory")


def _worker_deaths_named(source, workers: int):
    """`source`, with a loader worker's death raised as one WorkerDied (`worker_death`)."""
    iterator = iter(source)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except RuntimeError as err:
            line = worker_death(err, workers, _worker_signals(source))
            if line is None:
                raise
            raise WorkerDied(line) from None
        yield item


class _TaskList(torch.utils.data.Sampler):
    """The current epoch's (indices, flips, epoch) tasks; replaced before each epoch."""

    def __init__(self) -> None:
        self.tasks: list[tuple[np.ndarray, np.ndarray, int]] = []

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


def _worker_init(_: int) -> None:
    # parallelism comes from worker processes; intra-op threads would only fight over the cores
    torch.set_num_threads(1)


class TrainLoader:
    """Iterate -> (images, labels int64 [B]) for this rank.

    images: float32 [B, 3, H, W], normalised on the CPU; with ``on_device=True`` a `RawBatch` (uint8 images,
    flips, augmentation random numbers) for `megaface.data.augment.prepare_batch` on the training device.
    """

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = True, workers: int = 2, flip: bool = True, normalize: str = "arcface_torch",
                 skip_corrupt: bool = False, log=None, on_device: bool = False, augment: Augment | None = None,
                 pin_memory: bool = False, device: torch.device | None = None, strict_decode: bool = False,
                 decode: str = "cpu", device_decoder: Decoder | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (per-rank batch), got {batch_size}")
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalize mode {normalize!r}; choose one of {', '.join(NORMALIZE_MODES)}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, int(batch_size), int(rank), int(world_size)
        self.seed, self.drop_last, self.workers, self.flip = int(seed), bool(drop_last), int(workers), bool(flip)
        self.normalize, self.skip_corrupt = normalize, bool(skip_corrupt)
        self.on_device, self.augment, self.pin_memory = bool(on_device), augment or Augment(), bool(pin_memory)
        check_input_path(decode, strict_decode, "device" if self.on_device else "host", self.augment.enabled)
        decoder = None
        if decode == "gpu":  # JPEGs cross compressed and are decoded on the device (megaface.data.device_decode)
            if device is None:
                raise ValueError("data.decode=gpu decodes on the training device: build the loader with a device")
            decoder = device_decoder or nvjpeg_decoder(device)
        # with a device, batch k+1 is copied there (one batch ahead) before batch k is handed out
        self._copy = DeviceCopy(device, decoder) if (device is not None and self.on_device) else None
        self._ahead = 0  # batches taken from the epoch but not handed out yet (0 or 1)
        self.num_samples = len(dataset)
        self.global_batch = self.batch_size * self.world_size
        if len(self) == 0:
            raise ValueError(
                f"dataset of {self.num_samples} samples is smaller than one global batch ({self.global_batch} = "
                f"{self.batch_size} x {self.world_size} ranks) with drop_last; lower batch_size or add data"
            )
        self._epoch, self._position = 0, 0
        self.skipped = 0
        self.skipped_where: list[str] = []
        self.damaged = 0  # images decoded despite libjpeg warnings (damaged entropy data), this run
        self.damaged_where: list[str] = []
        self._warned_classes = False
        self._log = log or print
        self._task = _BatchTask(dataset, self.skip_corrupt, seed=self.seed, augment=self.augment,
                                strict_decode=bool(strict_decode), decode=decode)
        self._sampler = _TaskList()
        self._pool: torch.utils.data.DataLoader | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._position = int(epoch), 0

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full if self.drop_last or rest == 0 else full + 1

    def _epoch_samples(self) -> int:
        return len(self) * self.global_batch if self.drop_last else self.num_samples

    def _rank_slice(self, start: int) -> tuple[int, int]:
        """Permutation positions [a, b) of this rank within the global batch starting at `start`."""
        m = min(self.global_batch, self.num_samples - start)
        if m == self.global_batch:
            return start + self.rank * self.batch_size, start + (self.rank + 1) * self.batch_size
        base, extra = divmod(m, self.world_size)
        a = start + self.rank * base + min(self.rank, extra)
        return a, a + base + (self.rank < extra)

    def _tasks(self, perm: np.ndarray, flips: np.ndarray, first: int):
        for start in range(first, self._epoch_samples(), self.global_batch):
            a, b = self._rank_slice(start)
            idx = perm[a:b]
            yield idx, (flips[idx] if self.flip else np.zeros(len(idx), dtype=bool)), self._epoch

    def __iter__(self):
        # an iteration abandoned while a batch was ahead gives that batch back
        self._position -= self._ahead * self.global_batch
        self._ahead = 0
        if self._copy is None:
            yield from self._batches()
            return
        batches = self._batches()
        first = next(batches, None)
        ahead = self._copy.start(first) if first is not None else None
        self._ahead = int(ahead is not None)
        while ahead is not None:
            current = self._copy.ready(ahead)
            following = next(batches, None)  # its copy overlaps the step on `current` (CUDA)
            ahead = self._copy.start(following) if following is not None else None
            self._ahead = int(ahead is not None)  # an epoch that just ended has nothing ahead
            yield current

    def _batches(self):
        if self._position >= self._epoch_samples():
            self.set_epoch(self._epoch + 1)
        perm = epoch_permutation(self.num_samples, self.seed, self._epoch)
        flips = epoch_flips(self.num_samples, self.seed, self._epoch)
        tasks = list(self._tasks(perm, flips, self._position))
        source: Iterable[Any]
        if self.workers > 0 and tasks:
            self._sampler.tasks = tasks
            source = self._worker_pool()
        else:
            source = (self._task[t] for t in tasks)
        whole_epoch, top_label = self._position == 0, -1
        declared = getattr(self.dataset, "num_classes", None)
        used = np.zeros(int(declared), dtype=bool) if declared else None  # the classes one epoch's labels use
        for item in _worker_deaths_named(source, self.workers):
            if isinstance(item, _WorkerFailure):
                raise item.error()
            images, labels, skipped, uniforms, damaged = item
            top_label = max(top_label, int(labels.max())) if labels.numel() else top_label
            if used is not None and labels.numel() and top_label < used.size:
                used[labels.numpy()] = True
            self._position += self.global_batch
            if skipped:
                self._report(skipped)
            if damaged:
                self._report_damaged(damaged)
            if not self.on_device:
                yield normalize_nchw(images, self.normalize), labels
                continue
            raw = RawBatch(images, uniforms, self.augment)
            if self.pin_memory and self.workers == 0:  # a worker pool pins in its own thread
                raw, labels = raw.pin_memory(), labels.pin_memory()
            yield raw, labels
        if whole_epoch and self.world_size == 1:  # one rank sees every label only without sharding
            self._check_class_count(top_label, int(used.sum()) if used is not None else top_label + 1)
        self.set_epoch(self._epoch + 1)

    def _check_class_count(self, top_label: int, used: int) -> None:
        declared = getattr(self.dataset, "num_classes", None)
        if declared is not None and not self._warned_classes and used < declared:
            self._warned_classes = True
            self._log(f"data: warning: the data declares {declared} classes but the labels of one epoch use "
                      f"{used} of them (up to {top_label}); {declared - used} FC7 rows are never trained. Fine for "
                      "a subset of a pack; otherwise fix the class count (property file)")

    def _worker_pool(self) -> torch.utils.data.DataLoader:
        # Workers persist across epochs (forking a process that holds torch costs ~0.5 s); the sampler
        # lives in this process, so handing it a new task list re-targets them.
        if self._pool is None:
            self._pool = torch.utils.data.DataLoader(
                self._task, batch_size=None, sampler=self._sampler, num_workers=self.workers,
                worker_init_fn=_worker_init, prefetch_factor=2, persistent_workers=True,
                multiprocessing_context="fork", pin_memory=self.pin_memory,
            )
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._pool = None

    def _report(self, skipped: list[str]) -> None:
        self.skipped += len(skipped)
        self.skipped_where += skipped[: max(0, 100 - len(self.skipped_where))]
        self._log(f"data: skipped {len(skipped)} corrupt image(s) ({self.skipped} so far), e.g. {skipped[0]}")

    def _report_damaged(self, damaged: list[tuple[str, str]]) -> None:
        self.damaged += len(damaged)
        self.damaged_where += [where for where, _ in damaged][: max(0, 100 - len(self.damaged_where))]
        where = "; ".join(w for w, _ in damaged[:5]) + (f"; +{len(damaged) - 5} more" if len(damaged) > 5 else "")
        self._log(f"data: warning: {len(damaged)} image(s) decoded from damaged JPEG data ({self.damaged} so far; "
                  f"libjpeg: {damaged[0][1]}): {where}; data.strict_decode=true stops on them")

    def state_dict(self) -> dict:
        epoch, position = self._epoch, self._position - self._ahead * self.global_batch
        if position >= self._epoch_samples():
            epoch, position = epoch + 1, 0
        return {"format": STATE_FORMAT, "epoch": epoch, "position": position, "seed": self.seed,
                "num_samples": self.num_samples, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        if int(state["num_samples"]) != self.num_samples or int(state["seed"]) != self.seed:
            raise ValueError(
                f"loader state was saved for {state['num_samples']} samples with seed {state['seed']}, but this "
                f"loader has {self.num_samples} samples with seed {self.seed}; resume with the same data and seed"
            )
        position = int(state["position"])
        if position % self.global_batch and position < self._epoch_samples():
            raise ValueError(
                f"loader state position {position} is not a multiple of the global batch {self.global_batch}; "
                "resume with the same global batch size (batch_size x world_size)"
            )
        self._epoch, self._position, self.skipped = int(state["epoch"]), position, int(state.get("skipped", 0))
        self._ahead = 0

