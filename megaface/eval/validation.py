"""Verification during training: the seed's log lines per pack, best-so-far tracking, tensorboard scalars.

Every rank embeds its share of each pack (so it works when the model is a ZeRO-3 engine's module); rank 0
scores and logs, and broadcasts the results so that `.best` and `.improved` agree on every rank (saving a
"best" backbone under ZeRO-3 needs all ranks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from megaface.distributed import DistState
from megaface.distributed.comm import broadcast_object, gather_rows
from megaface.eval.embed import check_normalize, decode_images, embed_share, num_forward_batches, shard_range
from megaface.eval.verification import evaluate, format_result


def read_bin(path: str | os.PathLike) -> tuple[list[Any], list[bool]]:
    """Images and issame flags of a verification pack (a .bin file or an OFRecord directory), checked for a
    consistent pair layout."""
    path = str(path)
    if os.path.isdir(path):  # an OFRecord verification set (part-* files of encoded + issame)
        from megaface.data.ofrecord import load_verification

        images, issame = load_verification(path)
        if not issame:
            raise ValueError(f"{path}: the OFRecord verification set holds no pairs")
        return images, issame
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification pack {path!r} does not exist; fix the path or drop it from "
                                "the validation list (packs are never skipped silently)")
    from megaface.data import load_bin

    images, issame = load_bin(path)
    if len(images) % 2:
        raise ValueError(f"{path}: {len(images)} images, an odd count; a pack stores 2 images per pair")
    if len(issame) != len(images) // 2:
        raise ValueError(f"{path}: {len(issame)} issame flags for {len(images)} images "
                         f"({len(images) // 2} pairs); the pack is truncated or corrupt")
    if not issame:
        raise ValueError(f"{path}: the pack holds no pairs")
    return list(images), [bool(x) for x in issame]


def check_validation_packs(paths: Sequence[str | os.PathLike]) -> dict[str, int]:
    """Start-up check of every verification pack: open it, count its pairs, decode its first and last image.

    Returns {pack name: number of pairs}. Raises FileNotFoundError or ValueError naming the pack (and the
    image index when an image fails), so a damaged pack stops the job before training, not hours into it.
    """
    pairs: dict[str, int] = {}
    for path in paths:
        images, issame = read_bin(path)
        check_pack_images(path, images)
        pairs[pack_name(path)] = len(issame)
    return pairs


def check_pack_images(path: str | os.PathLike, images: Sequence[Any]) -> None:
    """Decode a pack's first and last image (they must decode, and be of one size); errors name the image."""
    first_last = sorted({0, len(images) - 1})
    for index in first_last:
        try:
            decoded = decode_images([images[index]])
        except ValueError as err:  # CorruptImageError is a ValueError
            raise ValueError(
                f"verification pack {path}: image {index} of {len(images)} (pair {index // 2}) cannot be "
                f"decoded: {' '.join(str(err).split())}; re-create the pack or drop it from validation.bins"
            ) from None
        if index == 0:
            shape = decoded.shape[1:]
        elif decoded.shape[1:] != shape:
            raise ValueError(
                f"verification pack {path}: image {index} is {decoded.shape[1:]} but image 0 is {shape}; "
                "a pack holds aligned images of one size: re-create it")


def pack_name(path: str | os.PathLike) -> str:
    """`/data/lfw.bin` -> `lfw` (the name in `Validation on [lfw]:`)."""
    return Path(path).stem


class _Pack:
    """One pack: this rank's decoded share (decoded once, on first use) and the issame flags."""

    def __init__(self, path: str, state: DistState) -> None:
        self.path, self.name = path, pack_name(path)
        images, self.issame = read_bin(path)
        check_pack_images(path, images)  # at start-up, not at the first validation hours in
        self.num_images = len(images)
        start, stop = shard_range(self.num_images, state.world_size, state.rank)
        self._encoded_local = images[start:stop]
        self._probe = images[start if stop > start else 0]
        self._decoded: np.ndarray | None = None

    def decoded_local(self) -> np.ndarray:
        if self._decoded is None:
            probe = decode_images([self._probe])
            self._decoded = decode_images(self._encoded_local) if self._encoded_local else probe[:0]
            self._shape = probe.shape[1:]
            self._encoded_local = []
        return self._decoded


class Validator:
    """Runs the verification packs `bin_paths` on a model; all ranks call `run` together.

    `.best[name]` is the best Accuracy-Flip seen so far; `.improved` lists the packs that set a new best in
    the last run. `writer`: anything with `add_scalar(tag, value, step)` (e.g. a tensorboard SummaryWriter).
    """

    def __init__(self, bin_paths: Sequence[str | os.PathLike], state: DistState, batch_size: int = 64,
                 normalize: str = "arcface_torch", writer: Any = None, nrof_folds: int = 10) -> None:
        if not bin_paths:
            raise ValueError("Validator needs at least one verification pack (.bin) path")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.state, self.batch_size, self.writer, self.nrof_folds = state, batch_size, writer, nrof_folds
        self.normalize = check_normalize(normalize)
        self.packs = [_Pack(str(p), state) for p in bin_paths]
        names = [p.name for p in self.packs]
        if len(set(names)) != len(names):
            raise ValueError(f"verification packs share a name: {names}; give each pack a distinct file name")
        self.best: dict[str, float] = {}
        self.improved: list[str] = []

    def _embed(self, model: torch.nn.Module, pack: _Pack) -> tuple[np.ndarray, np.ndarray]:
        local = pack.decoded_local()
        batches = num_forward_batches(pack.num_images, self.state.world_size, self.batch_size)
        emb, emb_flip = embed_share(model, local, batches, self.batch_size, self.normalize, True,
                                    pack._shape, self.state)
        assert emb_flip is not None  # flip=True
        return (gather_rows(emb.contiguous(), self.state.group).cpu().numpy(),
                gather_rows(emb_flip.contiguous(), self.state.group).cpu().numpy())

    def _score(self, pack: _Pack, emb: np.ndarray, emb_flip: np.ndarray) -> dict[str, Any] | None:
        if not self.state.is_main:
            return None
        if not (np.isfinite(emb).all() and np.isfinite(emb_flip).all()):
            # A diverged model: report NaN (printed as "nan") instead of aborting the training run.
            nan = float("nan")
            return {"accuracy": nan, "std": nan, "xnorm": nan, "embedding_shape": emb.shape,
                    "error": "embeddings contain NaN or infinite values"}
        result = evaluate(emb, emb_flip, pack.issame, self.nrof_folds)
        result.pop("tpr"), result.pop("fpr")  # keep the broadcast small
        return result

    def run(self, model: torch.nn.Module, iteration: int,
            log: Callable[[str], Any] = print) -> dict[str, dict[str, Any]]:
        """Embed and score every pack; rank 0 logs the seed's lines. Returns {name: result} on every rank."""
        was_training = model.training
        model.eval()
        results: dict[str, dict[str, Any]] = {}
        try:
            for pack in self.packs:
                emb, emb_flip = self._embed(model, pack)
                result = self._score(pack, emb, emb_flip)
                if result is not None:  # the main rank's; the broadcast below brings it to the others
                    for line in format_result(pack.name, result):
                        log(line)
                    results[pack.name] = result
        finally:
            model.train(was_training)
        results = broadcast_object(results, src=0, group=self.state.group)
        self._update_best(results, iteration)
        return results

    def _update_best(self, results: dict[str, dict[str, Any]], iteration: int) -> None:
        self.improved = []
        for name, result in results.items():
            acc = result["accuracy"]
            if not np.isfinite(acc):
                continue
            if name not in self.best or acc > self.best[name]:
                self.best[name] = acc
                self.improved.append(name)
            if self.writer is not None and self.state.is_main:
                self.writer.add_scalar(f"val/{name}/accuracy_flip", acc, iteration)
                self.writer.add_scalar(f"val/{name}/xnorm", result["xnorm"], iteration)
                self.writer.add_scalar(f"val/{name}/best_accuracy_flip", self.best[name], iteration)
