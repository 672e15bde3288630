"""JPEG/PNG decoding and pixel normalisation.

Decoder choice: OpenCV's ``cv2.imdecode`` (libjpeg-turbo inside the opencv-python wheels). Measured on this
machine on 112x112 q95 JPEGs, single thread: cv2 ~6,200 img/s, simplejpeg 1.9 ~3,600-3,800 img/s (it pays
a per-call Python overhead that dominates at 112x112), Pillow ~1,700 img/s (``benchmarks/loader.py``
re-measures all three). cv2 is already a dependency, is maintained by the OpenCV project, and decodes PNG and
BMP as well. Pillow is the fallback when cv2 is not importable. OpenCV threads are turned off: parallelism
comes from loader worker processes, and nested thread pools only add contention.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import cv2

    cv2.setNumThreads(1)
except ImportError:  # pragma: no cover - opencv is a declared dependency
    cv2 = None

NORMALIZE_MODES = ("arcface_torch", "oneflow", "none")


class CorruptImageError(ValueError):
    """An encoded image that the decoder rejects."""


def decode_image(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Encoded image -> uint8 [H, W, 3] RGB. Raises CorruptImageError when the bytes do not decode."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.astype(np.uint8, copy=False).ravel()
    if buf.size == 0:
        raise CorruptImageError("empty image payload (0 bytes)")
    if cv2 is not None:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if img is None:
            raise CorruptImageError(f"cannot decode image ({buf.size} bytes, starts {bytes(buf[:4]).hex()})")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return _decode_pil(buf)


def _decode_pil(buf: np.ndarray) -> np.ndarray:  # pragma: no cover - used only without opencv
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(buf.tobytes())) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as err:
        raise CorruptImageError(f"cannot decode image ({buf.size} bytes): {err}") from err


def encode_jpeg(image_rgb: np.ndarray, quality: int = 95) -> bytes:
    """uint8 [H, W, 3] RGB -> JPEG bytes (stored colour order is RGB, as every JPEG reader expects)."""
    if cv2 is None:  # pragma: no cover
        import io

        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(image_rgb).save(out, format="JPEG", quality=quality)
        return out.getvalue()
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image_rgb.shape}")
    return buf.tobytes()


def normalize_batch(images_uint8_nhwc: np.ndarray | torch.Tensor, mode: str = "arcface_torch") -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W].

    ``arcface_torch``: (x/255 - 0.5)/0.5 (InsightFace PyTorch); ``oneflow``: (x - 127.5)/128 (the OneFlow seed);
    ``none``: x as float.
    """
    x = torch.as_tensor(images_uint8_nhwc)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"normalize_batch expects uint8 [N, H, W, 3] images, got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).to(torch.float32).contiguous()
    if mode == "arcface_torch":
        # same operation order as InsightFace's transforms, so results match to the last bit
        return x.div_(255.0).sub_(0.5).div_(0.5)
    if mode == "oneflow":
        return x.sub_(127.5).div_(128.0)
    if mode == "none":
        return x
    raise ValueError(f"unknown normalize mode {mode!r}; choose one of {', '.join(NORMALIZE_MODES)}")
