"""The training input path on the device: uint8 batches in, normalised (and augmented) batches out.

Loader workers hand over uint8 NCHW images (a quarter of the bytes of float32, pinned when the device is a GPU),
already flipped: the worker's copy into the batch buffer (HWC -> CHW) writes a flipped image in the same pass,
for free, where a flip on the device would be one more pass over the batch. The loader copies one batch ahead
(`DeviceCopy`: non_blocking, on a side stream on CUDA) and `prepare_batch` runs the augmentations and the pixel
normalisation on the training device, then casts to the backbone's dtype:

    RawBatch.images uint8 [b, 3, H, W] (flipped, CPU) -> device -> float32 -> augmentations (each on its chosen
      samples) -> normalize (the same operations as `decode.normalize_nchw`) -> backbone dtype/layout

Randomness: the flip of a sample is `loader.epoch_flips` as before, and every random number of an augmentation
(whether it fires, its strength) is a function of (data.seed, epoch, dataset index, slot), drawn by a
counter-based hash (`sample_uniforms`) in the loader worker. Neither depends on the world size, the worker
count, the device or a resume, so exact resume holds with augmentations on. With every augmentation off the
result is bit-identical to the former path that normalised on the CPU.

The augmentations (`Augment`, the `data.augment` section; each off by default, each with a probability):
- arcface_torch's DALI set: a down-and-up resize (`lowres_*`, DALI: p 0.1, side 0.5-0.8), a Gaussian blur
  (`blur_*`, p 0.2), a hue/saturation shift in HSV (`hsv_*`, p 0.2, hue 0-20 degrees, saturation x1-1.2) and
  grayscale (`gray_p`, 0.1);
- a random resized crop (`crop_mode: resize`);
- AdaFace's set: the crop that keeps the crop in place and zeroes the rest (`crop_mode: pad`, p 0.2, scale
  0.2-1), the low-resolution resize (`lowres_*`, side 0.2-1) and photometric jitter (`photometric_*`,
  brightness/contrast/saturation 0.5).
They run in float32 in the [0, 255] pixel range (rounded back to whole pixel values after each resampling,
as a uint8 pipeline would), in this order: crop, low resolution, blur, photometric, HSV, grayscale (on the
flipped image: each is mirror-symmetric in distribution, so the order against the flip changes nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from megaface import vocab
from megaface.data.decode import normalize_nchw
from megaface.data.device_decode import Decoder, EncodedImages, decode_on_device

# Slots of a sample's uniform numbers: one per random decision, fixed, so that adding an augmentation never
# changes the draws of another.
SLOT_CROP, SLOT_CROP_SCALE, SLOT_CROP_RATIO, SLOT_CROP_X, SLOT_CROP_Y = 1, 2, 3, 4, 5  # slot 0: unused
SLOT_LOWRES, SLOT_LOWRES_SIDE, SLOT_BLUR, SLOT_BLUR_SIGMA = 6, 7, 8, 9
SLOT_PHOTO, SLOT_BRIGHTNESS, SLOT_CONTRAST, SLOT_SATURATION = 10, 11, 12, 13
SLOT_HSV, SLOT_HUE, SLOT_HSV_SATURATION, SLOT_GRAY = 14, 15, 16, 17
NUM_SLOTS = 18


@dataclass(frozen=True)
class Augment:
    """Training-time augmentations on the device (the `data.augment` section); every probability 0 = off."""

    crop_p: float = 0.0
    """Probability of the crop (AdaFace uses 0.2 with crop_mode pad)."""
    crop_mode: vocab.CropMode = "pad"
    """pad: keep the crop in place and zero the rest (AdaFace); resize: resize the crop to the full image."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Range of the crop's area as a fraction of the image."""
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    """Range of the crop's aspect ratio (width / height), drawn log-uniformly."""
    lowres_p: float = 0.0
    """Probability of the down-and-up resize (AdaFace 0.2; arcface_torch's DALI set 0.1)."""
    lowres_side: tuple[float, float] = (0.2, 1.0)
    """Range of the small side as a fraction of the image side (AdaFace 0.2-1; DALI 0.5-0.8)."""
    blur_p: float = 0.0
    """Probability of a Gaussian blur (arcface_torch's DALI set 0.2)."""
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    """Range of the blur's standard deviation in pixels."""
    photometric_p: float = 0.0
    """Probability of brightness, contrast and saturation jitter (AdaFace 0.2)."""
    brightness: float = 0.5
    """Brightness factor drawn from [1 - brightness, 1 + brightness]."""
    contrast: float = 0.5
    """Contrast factor drawn from [1 - contrast, 1 + contrast]."""
    saturation: float = 0.5
    """Saturation factor drawn from [1 - saturation, 1 + saturation]."""
    hsv_p: float = 0.0
    """Probability of the HSV shift (arcface_torch's DALI set 0.2)."""
    hsv_hue: tuple[float, float] = (0.0, 20.0)
    """Hue rotation range in degrees."""
    hsv_saturation: tuple[float, float] = (1.0, 1.2)
    """Saturation multiplier range."""
    gray_p: float = 0.0
    """Probability of turning the image gray (arcface_torch's DALI set 0.1)."""

    @property
    def enabled(self) -> bool:
        return any(p > 0 for p in (self.crop_p, self.lowres_p, self.blur_p, self.photometric_p, self.hsv_p,
                                   self.gray_p))


@dataclass
class RawBatch:
    """A rank's batch as the loader hands it over: uint8 pixels and each sample's random numbers."""

    images: torch.Tensor | EncodedImages
    """uint8 [b, 3, H, W], flipped where the sample drew a flip; pinned when the loader's device is a GPU.
    Under data.decode=gpu, until `to` decodes them on the device: the batch's JPEGs (`EncodedImages`)."""
    uniforms: torch.Tensor | None = None
    """float32 [b, NUM_SLOTS]: the samples' random numbers (`sample_uniforms`); None when no augmentation is on."""
    augment: Augment = field(default_factory=Augment)

    def __len__(self) -> int:
        return len(self.images)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.images, self.uniforms) if isinstance(t, torch.Tensor)]

    def to(self, device: torch.device, non_blocking: bool = True, decoder: Decoder | None = None) -> RawBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)
        if isinstance(self.images, EncodedImages):
            if decoder is None:
                raise ValueError("the batch holds JPEGs (data.decode=gpu) and no device decoder was given")
            return RawBatch(decode_on_device(self.images, device, decoder), move(self.uniforms), self.augment)
        return RawBatch(self.images.to(device, non_blocking=non_blocking), move(self.uniforms), self.augment)

    def pin_memory(self) -> RawBatch:
        uniforms = None if self.uniforms is None else self.uniforms.pin_memory()
        return RawBatch(self.images.pin_memory(), uniforms, self.augment)


# ---- the random numbers ---------------------------------------------------------------------------------

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices: np.ndarray, slots: int = NUM_SLOTS) -> np.ndarray:
    """float32 [len(indices), slots] in [0, 1): a pure function of (seed, epoch, dataset index, slot)."""
    key = _splitmix64(np.array([seed], dtype=np.uint64)) ^ _splitmix64(np.array([epoch + (1 << 32)], np.uint64))
    with np.errstate(over="ignore"):
        counters = (np.asarray(indices, dtype=np.uint64)[:, None] * np.uint64(NUM_SLOTS)
                    + np.arange(slots, dtype=np.uint64)[None, :])
        bits = _splitmix64(counters ^ key)
    return ((bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)).astype(np.float32)


# ---- the device side ------------------------------------------------------------------------------------

def _lerp(u: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return bounds[0] + u * (bounds[1] - bounds[0])


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] RGB -> [n, 1, H, W] luminance (ITU-R 601, as torchvision's rgb_to_grayscale)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _crop(x: torch.Tensor, u: torch.Tensor, aug: Augment) -> torch.Tensor:
    n, _, h, w = x.shape
    area = _lerp(u[:, SLOT_CROP_SCALE], aug.crop_scale) * (h * w)
    log_ratio = _lerp(u[:, SLOT_CROP_RATIO], (math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])))
    ratio = torch.exp(log_ratio)
    cw = torch.sqrt(area * ratio).round().clamp(1, w)
    ch = torch.sqrt(area / ratio).round().clamp(1, h)
    x0 = (u[:, SLOT_CROP_X] * (w - cw + 1)).floor()
    y0 = (u[:, SLOT_CROP_Y] * (h - ch + 1)).floor()
    if aug.crop_mode == "pad":  # AdaFace: the crop stays where it was, everything else is zero
        cols = torch.arange(w, device=x.device, dtype=x.dtype)
        rows = torch.arange(h, device=x.device, dtype=x.dtype)
        inside_x = (cols[None] >= x0[:, None]) & (cols[None] < (x0 + cw)[:, None])
        inside_y = (rows[None] >= y0[:, None]) & (rows[None] < (y0 + ch)[:, None])
        return x * (inside_y[:, None, :, None] & inside_x[:, None, None, :]).to(x.dtype)
    # resize: sample the crop box on the full output grid (bilinear, corners aligned to pixel edges)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = cw / w
    theta[:, 1, 1] = ch / h
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).round()


def _lowres(x: torch.Tensor, u: torch.Tensor, aug: Augment) -> torch.Tensor:
    h, w = x.shape[2:]
    sides = _lerp(u[:, SLOT_LOWRES_SIDE], aug.lowres_side).mul(h).floor().clamp(1, h).long().tolist()
    out = torch.empty_like(x)
    for side in sorted(set(sides)):  # one resize pair per distinct small side
        pick = torch.tensor([k for k, s in enumerate(sides) if s == side], device=x.device)
        small = F.interpolate(x[pick], size=(side, max(1, round(side * w / h))), mode="bilinear",
                              antialias=True, align_corners=False)
        out[pick] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out.clamp_(0, 255).round_()


def _blur(x: torch.Tensor, u: torch.Tensor, aug: Augment) -> torch.Tensor:
    n, c, h, w = x.shape
    sigma = _lerp(u[:, SLOT_BLUR_SIGMA], aug.blur_sigma).clamp_min(1e-3)
    radius = max(1, math.ceil(3 * aug.blur_sigma[1]))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, k], one per channel
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w).round_()


def _photometric(x: torch.Tensor, u: torch.Tensor, aug: Augment) -> torch.Tensor:
    """torchvision ColorJitter's brightness, contrast, saturation (in that order), each clamped to [0, 255]."""
    b = _lerp(u[:, SLOT_BRIGHTNESS], (1 - aug.brightness, 1 + aug.brightness))[:, None, None, None]
    c = _lerp(u[:, SLOT_CONTRAST], (1 - aug.contrast, 1 + aug.contrast))[:, None, None, None]
    s = _lerp(u[:, SLOT_SATURATION], (1 - aug.saturation, 1 + aug.saturation))[:, None, None, None]
    x = (x * b).clamp_(0, 255)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + c * (x - mean)).clamp_(0, 255)
    gray = _gray(x)
    return (gray + s * (x - gray)).clamp_(0, 255).round_()


def _hsv(x: torch.Tensor, u: torch.Tensor, aug: Augment) -> torch.Tensor:
    """Rotate the hue and scale the saturation (RGB -> HSV -> RGB)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    value, _ = x.max(1)
    low, _ = x.min(1)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))  # in sixths of a turn
    sat = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value))
    hue = (hue + _lerp(u[:, SLOT_HUE], aug.hsv_hue)[:, None, None] / 60.0) % 6
    sat = (sat * _lerp(u[:, SLOT_HSV_SATURATION], aug.hsv_saturation)[:, None, None]).clamp_(0, 1)
    chroma = value * sat
    k = torch.stack([(5 + hue) % 6, (3 + hue) % 6, (1 + hue) % 6], 1)  # R, G, B
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return (value[:, None] - chroma[:, None] * ramp).clamp_(0, 255).round_()


_OPS = (("crop_p", SLOT_CROP, _crop), ("lowres_p", SLOT_LOWRES, _lowres), ("blur_p", SLOT_BLUR, _blur),
        ("photometric_p", SLOT_PHOTO, _photometric), ("hsv_p", SLOT_HSV, _hsv))


def augment_pixels(x: torch.Tensor, u: torch.Tensor, aug: Augment) -> torch.Tensor:
    """float32 [b, 3, H, W] in [0, 255] -> the same with each augmentation applied to the samples it drew."""
    for name, slot, op in _OPS:
        p = getattr(aug, name)
        if p <= 0:
            continue
        chosen = (u[:, slot] < p).nonzero().flatten()  # a host sync per augmentation that is on
        if chosen.numel():
            x[chosen] = op(x[chosen], u[chosen], aug)
    if aug.gray_p > 0:
        gray = _gray(x).round_().expand_as(x)
        x = torch.where((u[:, SLOT_GRAY] < aug.gray_p)[:, None, None, None], gray, x)
    return x


def prepare_batch(batch: RawBatch, normalize: str, dtype: torch.dtype = torch.float32,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A RawBatch already on the training device -> the backbone's input (see the module docstring).

    Without augmentations: uint8 -> `normalize_nchw` -> dtype/layout, no host sync.
    """
    x = batch.images
    if not isinstance(x, torch.Tensor):
        raise ValueError("prepare_batch takes a batch on the device (RawBatch.to decodes data.decode=gpu's JPEGs)")
    if batch.augment.enabled:
        if batch.uniforms is None:
            raise ValueError("augmentations are on but the batch carries no random numbers (RawBatch.uniforms)")
        x = augment_pixels(x.to(torch.float32), batch.uniforms, batch.augment)
    x = normalize_nchw(x, normalize)
    return x.to(dtype=dtype, memory_format=memory_format)


class DeviceCopy:
    """Copies a (RawBatch, labels) pair to the training device ahead of its use.

    `start` begins the copy (on CUDA: from pinned memory, non_blocking, on a side stream, so it overlaps the
    step that is running); `ready` makes the compute stream wait for it. Elsewhere the copy is a plain `.to`.
    The loader calls `start` for batch k+1 before it hands out batch k (`TrainLoader(device=...)`).
    """

    def __init__(self, device: torch.device, decoder: Decoder | None = None) -> None:
        self.device, self.decoder = device, decoder
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, item: tuple[RawBatch, torch.Tensor]) -> tuple[RawBatch, torch.Tensor]:
        raw, labels = item
        if self.stream is None:
            return raw.to(self.device, decoder=self.decoder), labels.to(self.device, non_blocking=True)
        with torch.cuda.stream(self.stream):
            return raw.to(self.device, decoder=self.decoder), labels.to(self.device, non_blocking=True)

    def ready(self, item: tuple[RawBatch, torch.Tensor]) -> tuple[RawBatch, torch.Tensor]:
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            for tensor in (*item[0].tensors(), item[1]):
                tensor.record_stream(compute)  # the caching allocator must not reuse them before the step ends
        return item
