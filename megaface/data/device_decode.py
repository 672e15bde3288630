"""``data.decode: gpu``: JPEGs decoded on the training device (nvJPEG through ``torchvision.io.decode_jpeg``).

With ``data.decode: cpu`` (the default) loader workers decode every image with libjpeg-turbo and hand over
uint8 pixels: 37,632 bytes per 112x112 image cross into the main process and over PCIe. With ``gpu`` the
workers only read the records, check each JPEG's header (size, that it is a JPEG at all: `jpeg_header`) and
hand over the compressed bytes of the batch in one buffer, ~4-6 KB per MS1M image; the batch is decoded on
the device in one batched call when it is copied there (`megaface.data.augment.DeviceCopy`, one batch ahead),
then flipped, augmented and normalised there as on the cpu path.

What differs from ``cpu``:
- pixels: nvJPEG's IDCT and chroma upsampling round differently from libjpeg-turbo's, so pixels can differ by a
  few levels. A run resumes bit-exactly under the decoder it started with; switching decoders mid-run is a
  (small) change of data, not a resume.
- damaged data: a JPEG whose header reads but whose data nvJPEG refuses stops the run with its record named
  (there is no per-image replacement on the device); libjpeg's warnings about damaged entropy data are not
  seen, so ``data.strict_decode`` needs ``cpu``. Records that are unreadable or not JPEGs at all are found in
  the workers and follow ``data.skip_corrupt`` as on ``cpu``.
- non-JPEG images (PNG in an image folder, arrays of an in-memory dataset) are decoded in the workers and
  copied as pixels beside the JPEGs.

`Decoder` is the one seam: ``(list of uint8 1-D CPU tensors, device) -> list of uint8 [3, H, W] on the
device``; `nvjpeg_decoder` is torchvision's, the tests pass a host decoder to check everything around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from megaface.data.decode import CorruptImageError, decode_image
from megaface.vocab import DECODE_MODES, PREPARE_MODES

Decoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
"""Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic)."""


def check_input_path(decode: str, strict_decode: bool, prepare: str = "device", augmenting: bool = False) -> None:
    """data.decode, data.strict_decode, data.prepare and data.augment together (config load and TrainLoader both
    ask here)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"data.decode={decode!r}: choose one of {', '.join(DECODE_MODES)}")
    if prepare not in PREPARE_MODES:
        raise ValueError(f"data.prepare={prepare!r}: choose one of {', '.join(PREPARE_MODES)}")
    if decode == "gpu" and strict_decode:
        raise ValueError("data.strict_decode=true needs data.decode=cpu (libjpeg's warnings about damaged data are "
                         "what it checks; the device decoder gives none): drop one of the two")
    if prepare == "host" and decode == "gpu":
        raise ValueError("data.decode=gpu decodes on the training device, data.prepare=host normalises on the host: "
                         "set data.prepare=device (the default) or data.decode=cpu")
    if prepare == "host" and augmenting:
        raise ValueError("data.augment runs on the training device: set data.prepare=device (the default) or turn "
                         "the augmentations off")


def jpeg_header(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header; None when `data` is not a JPEG (no SOI marker).

    Raises CorruptImageError when it starts like a JPEG but its markers end before a frame header.
    """
    view = memoryview(data)
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= len(view):
        if view[pos] != 0xFF:
            break
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = (view[pos + 2] << 8) | view[pos + 3]
        if marker in _SOF:
            if pos + 9 > len(view) or length < 8:
                break
            height, width = (view[pos + 5] << 8) | view[pos + 6], (view[pos + 7] << 8) | view[pos + 8]
            if height and width:
                return height, width
            break
        if marker == 0xDA or length < 2:  # scan data before any frame header, or a bad length
            break
        pos += 2 + length
    raise CorruptImageError("JPEG header damaged (no frame header before the data); repack the image")


@dataclass
class EncodedImages:
    """A rank's batch as ``data.decode: gpu`` hands it over: compressed JPEGs, decoded on the device.

    Sample k is the JPEG ``data[offsets[k]:offsets[k + 1]]`` or, where that range is empty, the next image of
    `pixels` (decoded in the worker: not a JPEG). `flips` are applied after decoding.
    """

    data: torch.Tensor
    """uint8 [total bytes]: the batch's JPEGs, one after the other."""
    offsets: torch.Tensor
    """int64 [b + 1]."""
    pixels: torch.Tensor
    """uint8 [n, 3, H, W]: the samples that are not JPEGs, in batch order (n is usually 0)."""
    flips: torch.Tensor
    """bool [b]."""
    size: tuple[int, int]
    where: list[str]
    """Each sample's record location, for errors."""

    def __len__(self) -> int:
        return len(self.flips)

    @property
    def nbytes(self) -> int:
        """Bytes that cross to the device (JPEG bytes, host-decoded pixels, offsets and flips)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.offsets, self.pixels, self.flips))

    def pin_memory(self) -> EncodedImages:
        return EncodedImages(self.data.pin_memory(), self.offsets, self.pixels.pin_memory(), self.flips,
                             self.size, self.where)


def encode_batch(items: list[bytes | np.ndarray], flips: np.ndarray, size: tuple[int, int],
                 where: list[str], shared: bool = False) -> EncodedImages:
    """Worker side: JPEG bytes (bytes) and host-decoded HWC pixels (ndarray, not flipped) into one batch."""
    lengths = np.array([0 if isinstance(x, np.ndarray) else len(x) for x in items], dtype=np.int64)
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    decoded = [x for x in items if isinstance(x, np.ndarray)]
    pixels = torch.empty((len(decoded), 3, *size), dtype=torch.uint8)
    if shared:
        data.share_memory_()  # filled in place: sending it to the main process then copies nothing
        pixels.share_memory_()
    buffer = data.numpy()
    for x, start, stop in zip(items, offsets[:-1], offsets[1:], strict=True):
        if stop > start:
            buffer[start:stop] = np.frombuffer(x, dtype=np.uint8)
    for j, image in enumerate(decoded):
        pixels[j] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return EncodedImages(data, torch.from_numpy(offsets), pixels, torch.from_numpy(np.asarray(flips, dtype=bool)),
                         size, where)


def decode_on_device(batch: EncodedImages, device: torch.device, decoder: Decoder) -> torch.Tensor:
    """uint8 [b, 3, H, W] on `device`, flipped where the samples drew a flip."""
    bounds = batch.offsets.tolist()
    jpegs = [k for k in range(len(batch)) if bounds[k + 1] > bounds[k]]
    others = [k for k in range(len(batch)) if bounds[k + 1] == bounds[k]]
    h, w = batch.size
    out = torch.empty((len(batch), 3, h, w), dtype=torch.uint8, device=device)
    if jpegs:
        encoded = [batch.data[bounds[k]:bounds[k + 1]] for k in jpegs]
        try:
            decoded = decoder(encoded, device)
        except RuntimeError:
            decoded = [_decode_one(decoder, data, device, batch.where[k]) for k, data in zip(jpegs, encoded, strict=True)]
        for k, image in zip(jpegs, decoded, strict=True):
            if tuple(image.shape) != (3, h, w):
                raise CorruptImageError(f"{batch.where[k]}: decoded on the device to {list(image.shape)}, its header "
                                        f"said [3, {h}, {w}]; repack the image")
        out[jpegs] = torch.stack(decoded)
    if others:
        out[others] = batch.pixels.to(device, non_blocking=True)
    flips = batch.flips.to(device, non_blocking=True)[:, None, None, None]
    return torch.where(flips, out.flip(-1), out)


def _decode_one(decoder: Decoder, data: torch.Tensor, device: torch.device, where: str) -> torch.Tensor:
    try:
        return decoder([data], device)[0]
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise CorruptImageError(f"{where}: the device's JPEG decoder refused it ({reason}); repack the image, or "
                                "train with data.decode=cpu and data.skip_corrupt=true to skip it") from None


def host_decoder(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """megaface's CPU decoder behind the `Decoder` interface (what the tests put in nvJPEG's place); like a
    batched decoder it refuses the whole batch when one JPEG's data is damaged."""
    try:
        images = [decode_image(t.numpy().tobytes(), strict=True) for t in data]
    except CorruptImageError as err:
        raise RuntimeError(str(err)) from None
    return [torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).to(device) for x in images]


def nvjpeg_decoder(device: torch.device) -> Decoder:
    """torchvision's batched nvJPEG decoder for `device`, or a ValueError that says what is missing."""
    if device.type != "cuda":
        raise ValueError(f"data.decode=gpu decodes JPEGs with nvJPEG on a CUDA device, and this run's device is "
                         f"{device.type} (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}); "
                         "set data.decode=cpu")
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, OSError, RuntimeError) as err:
        raise ValueError(f"data.decode=gpu needs torchvision's decode_jpeg ({type(err).__name__}: {err}); install "
                         f"the torchvision release built for torch {torch.__version__}, or set data.decode=cpu") from None

    def decode(data: list[torch.Tensor], target: torch.device) -> list[torch.Tensor]:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=target))

    return decode
