"""Embedding extraction on any world size, safe under ZeRO-3.

Every rank embeds one contiguous share of the images (`shard_range`) and the shares are gathered in rank
order, so the result, identical on every rank, is in input order. Under ZeRO-3 each forward call
all-gathers parameters, so a rank that stops calling the model early would hang the others: every rank
therefore runs the same number of forward calls (`num_forward_batches`, derived from N, W and the batch
size alone, no communication), padding its last batches with blank images whose outputs are dropped.

| step                  | shape                                          |
|-----------------------|------------------------------------------------|
| images (all ranks)    | N encoded images or uint8 [H, W, 3] RGB arrays |
| share of rank r       | n_r = N // W + (r < N % W) images              |
| forward calls         | ceil(ceil(N / W) / batch_size) per rank (x2 with flip) |
| emb_local             | [n_r, D]                                       |
| gather_rows -> emb    | [N, D] float32 on every rank                   |
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from megaface.data.decode import decode_image_checked, normalize_batch
from megaface.distributed import DistState
from megaface.distributed.comm import gather_rows
from megaface.utils.progress import Progress
from megaface.vocab import NORMALIZE_MODES


def shard_range(num_items: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s contiguous share; the first N % W ranks hold one extra item."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def num_forward_batches(num_items: int, world_size: int, batch_size: int) -> int:
    """Forward calls every rank makes: enough batches for the largest share (ceil(N / W))."""
    return max(1, math.ceil(math.ceil(num_items / world_size) / batch_size))


def check_normalize(mode: str) -> str:
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize={mode!r} is not one of {NORMALIZE_MODES}; use the mode the model was "
                         "trained with ('arcface_torch' = (x/255-0.5)/0.5, 'oneflow' = (x-127.5)/128)")
    return mode


def decode_images(images: Sequence[Any]) -> np.ndarray:
    """Encoded bytes or uint8 HWC arrays -> one uint8 [N, H, W, 3] RGB array (all of one size)."""
    out: list[np.ndarray] = []
    damaged: list[tuple[int, str]] = []
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray) and img.ndim == 3:
            arr = img
        else:  # encoded: bytes, or a 1-D uint8 array as in some .bin files
            arr, damage = decode_image_checked(img.tobytes() if isinstance(img, np.ndarray) else bytes(img))
            if damage is not None:
                damaged.append((i, damage))
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
        if out and arr.shape != out[0].shape:
            raise ValueError(f"image {i} has shape {arr.shape} but earlier images are {out[0].shape}; "
                             "resize/align all images to one size (112x112 for the bundled models)")
        out.append(arr)
    if damaged:  # counted and named, never decoded silently (a training run can make this an error)
        shown = ", ".join(str(i) for i, _ in damaged[:10]) + (", ..." if len(damaged) > 10 else "")
        warnings.warn(f"{len(damaged)} image(s) decoded from damaged JPEG data (libjpeg: {damaged[0][1]}): "
                      f"positions {shown} of this share; their embeddings are of partly grey images",
                      UserWarning, stacklevel=2)
    return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def _model_device_dtype(model: torch.nn.Module, state: DistState) -> tuple[torch.device, torch.dtype]:
    # Under ZeRO-3 parameters are empty placeholders, but their device and dtype are still the real ones.
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return state.device, torch.float32


class _Share:
    """Images [start, stop) of a sequence, indexed from 0 (nothing is read until a batch needs it)."""

    def __init__(self, images: Sequence[Any], start: int, stop: int) -> None:
        self.images, self.start, self.stop = images, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        return self.images[self.start + i]


def _batch(images_local: Sequence[Any] | np.ndarray | _Share, lo: int, hi: int) -> np.ndarray:
    if isinstance(images_local, np.ndarray):  # already decoded uint8 [n, H, W, 3]
        return images_local[lo:hi]
    # Decoded one batch at a time: a 469k-image IJB-C folder never sits in memory as pixels.
    return decode_images([images_local[i] for i in range(lo, min(hi, len(images_local)))])


@torch.no_grad()
def embed_share(model: torch.nn.Module, images_local: Sequence[Any] | np.ndarray | _Share, num_batches: int,
                batch_size: int, normalize: str, flip: bool, image_shape: tuple[int, ...], state: DistState,
                on_batch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embed this rank's share in exactly `num_batches` batches (x2 with flip).

    `images_local`: decoded uint8 [n, H, W, 3], or a sequence of encoded images / HWC arrays decoded per
    batch. Batches past the end of the share hold one blank image whose output is discarded.
    `on_batch(real)` is called after each batch with its number of real images (progress display).
    Returns float32 tensors [n, D] on the model's device.
    """
    device, dtype = _model_device_dtype(model, state)
    outs: list[torch.Tensor] = []
    outs_flip: list[torch.Tensor] = []
    for b in range(num_batches):
        chunk = _batch(images_local, b * batch_size, (b + 1) * batch_size)
        real = len(chunk)
        if real == 0:  # share exhausted: a one-image blank batch keeps the forward count equal
            chunk = np.zeros((1, *image_shape), np.uint8)
        if tuple(chunk.shape[1:]) != tuple(image_shape):
            raise ValueError(f"batch {b} holds images of shape {chunk.shape[1:]} but the first image is "
                             f"{tuple(image_shape)}; align all images to one size (112x112 for the bundled models)")
        x = normalize_batch(chunk, normalize).to(device=device, dtype=dtype)
        outs.append(model(x)[:real].float())
        if flip:
            outs_flip.append(model(torch.flip(x, dims=[3]))[:real].float())
        if on_batch is not None:
            on_batch(real)
    emb = torch.cat(outs)
    return emb, (torch.cat(outs_flip) if flip else None)


def embed_images(model: torch.nn.Module, images: Sequence[Any], state: DistState, batch_size: int = 64,
                 normalize: str = "arcface_torch", flip: bool = True, progress: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Embeddings of `images` (and of their horizontal flips) as float32 numpy [N, D], on every rank.

    All ranks must call this with the same images (encoded bytes, 1-D encoded uint8 arrays or uint8 HWC RGB
    arrays; any sequence with len and indexing). The model runs in eval mode under no_grad and gets its
    previous mode back afterwards. Only this rank's share of `images` is read, one batch at a time.
    `progress`: the label of a progress display on the main rank (a bar on a terminal, lines when piped);
    None shows none. Rank 0's share times the world size stands for the count over all ranks.
    """
    check_normalize(normalize)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    total = len(images)
    if total == 0:
        raise ValueError("embed_images got no images")
    start, stop = shard_range(total, state.world_size, state.rank)
    # A rank with an empty share still needs the image size for its blank batches.
    image_shape = decode_images([images[start if stop > start else 0]]).shape[1:]
    num_batches = num_forward_batches(total, state.world_size, batch_size)
    was_training = model.training
    model.eval()
    try:
        with Progress(progress or "embed", total, "images", enabled=progress is not None and state.is_main) as bar:
            emb, emb_flip = embed_share(model, _Share(images, start, stop), num_batches, batch_size, normalize,
                                        flip, image_shape, state,
                                        on_batch=lambda real: bar.update(min(real * state.world_size,
                                                                             total - bar.done)))
    finally:
        model.train(was_training)
    emb_all = gather_rows(emb.contiguous(), state.group).cpu().numpy()
    flip_all = gather_rows(emb_flip.contiguous(), state.group).cpu().numpy() if emb_flip is not None else None
    return emb_all, flip_all
