"""data.decode=gpu (megaface.data.device_decode): the workers send JPEGs and the device decodes them.

nvJPEG needs a GPU (benchmarks/gpu_check.py checks it there); here megaface's host decoder stands in behind the
same `Decoder` interface, which checks everything around the decoder: batches, flips, augmentation numbers,
non-JPEG images, resume, errors and the bytes that cross.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from megaface.config import load_config
from megaface.data import CorruptImageError, TrainLoader, build_dataset, encode_jpeg
from megaface.data.augment import Augment, RawBatch, prepare_batch
from megaface.data.decode import decode_image
from megaface.data.device_decode import EncodedImages, host_decoder, jpeg_header, nvjpeg_decoder
from megaface.data.packs import PackWriter

CPU = torch.device("cpu")


def _pack(path, n_classes=4, per_class=6, damaged=()):
    rng = np.random.default_rng(0)
    with PackWriter(path) as w:
        for k in range(n_classes * per_class):
            img = cv2.GaussianBlur(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), (0, 0), 1.5)
            data = encode_jpeg(img)
            if k in damaged:  # header intact, entropy data replaced by garbage
                data = data[:len(data) // 3] + bytes(rng.integers(0, 255, len(data) // 3, dtype=np.uint8)) + b"\xff\xd9"
            w.add(k // per_class, data)
    return build_dataset("recordio", path)


def _loader(ds, decode, **kw):
    kw.setdefault("workers", 0)
    return TrainLoader(ds, 8, seed=3, on_device=True, device=CPU, decode=decode,
                       device_decoder=host_decoder if decode == "gpu" else None, **kw)


def test_jpeg_header_reads_the_frame_size() -> None:
    img = np.zeros((40, 56, 3), dtype=np.uint8)
    assert jpeg_header(encode_jpeg(img)) == (40, 56)
    progressive = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert jpeg_header(progressive) == (40, 56)
    assert jpeg_header(cv2.imencode(".jpg", img[:, :, 0])[1].tobytes()) == (40, 56)  # grayscale
    assert jpeg_header(cv2.imencode(".png", img)[1].tobytes()) is None  # not a JPEG: decoded in the worker
    with pytest.raises(CorruptImageError, match="JPEG header damaged"):
        jpeg_header(encode_jpeg(img)[:20])


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decoded_batches_equal_the_cpu_path(tmp_path, workers: int) -> None:
    ds = _pack(tmp_path / "p")
    aug = Augment(crop_p=0.5, photometric_p=0.5)
    cpu = list(_loader(ds, "cpu", augment=aug, workers=workers))
    gpu = list(_loader(ds, "gpu", augment=aug, workers=workers))
    assert len(cpu) == len(gpu) == 3
    for (a, la), (b, lb) in zip(cpu, gpu, strict=True):
        assert isinstance(b, RawBatch) and b.images.dtype == torch.uint8  # decoded by the copy to the device
        assert torch.equal(a.images, b.images) and torch.equal(a.uniforms, b.uniforms) and torch.equal(la, lb)
        assert torch.equal(prepare_batch(a, "arcface_torch"), prepare_batch(b, "arcface_torch"))


def test_what_crosses_is_the_compressed_batch(tmp_path) -> None:
    ds = _pack(tmp_path / "p")
    loader = _loader(ds, "gpu")
    loader._copy = None  # look at the batch before the copy decodes it
    raw, _ = next(iter(loader))
    assert isinstance(raw.images, EncodedImages) and len(raw.images) == len(raw) == 8
    jpeg_bytes = sum(len(ds[int(i)][1]) for i in range(len(ds))) / len(ds)
    assert raw.images.nbytes < 8 * (jpeg_bytes * 1.2 + 32) < 8 * 3 * 112 * 112 / 2
    with pytest.raises(ValueError, match="takes a batch on the device"):
        prepare_batch(raw, "arcface_torch")


def test_png_images_are_decoded_in_the_worker_beside_the_jpegs(tmp_path) -> None:
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        for j in range(4):
            img = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
            if j == 1:
                (tmp_path / "faces" / name / f"{j}.png").write_bytes(cv2.imencode(".png", img[:, :, ::-1])[1].tobytes())
            else:
                (tmp_path / "faces" / name / f"{j}.jpg").write_bytes(encode_jpeg(img))
    ds = build_dataset("folder", tmp_path / "faces")
    (a, _), = list(_loader(ds, "cpu"))
    (b, _), = list(_loader(ds, "gpu"))
    assert torch.equal(a.images, b.images)


def test_resume_under_device_decoding_is_exact(tmp_path) -> None:
    ds = _pack(tmp_path / "p", n_classes=6)
    whole = [raw.images for raw, _ in _loader(ds, "gpu")]
    run = _loader(ds, "gpu")
    for k, _ in enumerate(run):
        if k == 1:
            state = run.state_dict()
            break
    resumed = _loader(ds, "gpu")
    resumed.load_state_dict(state)
    rest = [raw.images for raw, _ in resumed]
    assert len(whole) == 4 and len(rest) == 2
    assert all(torch.equal(a, b) for a, b in zip(rest, whole[2:], strict=True))


def test_a_jpeg_the_device_cannot_decode_is_named(tmp_path) -> None:
    ds = _pack(tmp_path / "p", damaged=(5,))
    with pytest.raises(CorruptImageError) as err:
        list(_loader(ds, "gpu"))
    message = str(err.value)
    assert "key 6" in message and "device's JPEG decoder refused it" in message and "data.decode=cpu" in message
    assert "\n" not in message


def test_a_record_that_is_not_an_image_follows_skip_corrupt(tmp_path) -> None:
    rng = np.random.default_rng(0)
    with PackWriter(tmp_path / "p") as w:
        for k in range(16):
            img = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
            w.add(k // 4, encode_jpeg(img)[:30] if k == 3 else encode_jpeg(img))  # k 3: the header is cut
    ds = build_dataset("recordio", tmp_path / "p")
    with pytest.raises(CorruptImageError, match=r"key 4 .*JPEG header damaged.*skip_corrupt"):
        list(_loader(ds, "gpu"))
    logs: list[str] = []
    loader = _loader(ds, "gpu", skip_corrupt=True, log=logs.append)
    assert len(list(loader)) == 2 and loader.skipped == 1 and "key 4" in loader.skipped_where[0]


def test_decode_gpu_is_refused_where_it_cannot_run(tmp_path) -> None:
    ds = _pack(tmp_path / "p")
    with pytest.raises(ValueError, match=r"^data\.decode=gpu decodes JPEGs with nvJPEG on a CUDA device, and this "
                                         r"run's device is cpu .*set data\.decode=cpu$"):
        TrainLoader(ds, 8, on_device=True, device=CPU, decode="gpu")
    with pytest.raises(ValueError, match=r"^data\.decode=gpu decodes on the training device, data\.prepare=host"):
        TrainLoader(ds, 8, decode="gpu", device_decoder=host_decoder)
    with pytest.raises(ValueError, match=r"^data\.decode=gpu decodes on the training device, data\.prepare=host"):
        load_config(None, ["--train.max_steps=9", "--data.decode=gpu", "--data.prepare=host"])
    with pytest.raises(ValueError, match="build the loader with a device"):
        TrainLoader(ds, 8, on_device=True, decode="gpu", device_decoder=host_decoder)
    with pytest.raises(ValueError, match=r"data\.strict_decode=true needs data\.decode=cpu"):
        TrainLoader(ds, 8, on_device=True, device=CPU, decode="gpu", strict_decode=True, device_decoder=host_decoder)
    with pytest.raises(ValueError, match=r"data\.strict_decode=true needs data\.decode=cpu"):
        load_config(None, ["--train.max_steps=9", "--data.decode=gpu", "--data.strict_decode=true"])
    with pytest.raises(ValueError, match=r"data\.decode='nvjpeg' is not one of \['cpu', 'gpu'\]"):
        load_config(None, ["--train.max_steps=9", "--data.decode=nvjpeg"])
    assert load_config(None, ["--train.max_steps=9", "--data.decode=gpu"]).data.decode == "gpu"


def test_host_decoder_is_megafaces_decoder() -> None:
    img = np.random.default_rng(1).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    data = encode_jpeg(img)
    out, = host_decoder([torch.frombuffer(bytearray(data), dtype=torch.uint8)], CPU)
    assert torch.equal(out, torch.from_numpy(decode_image(data).transpose(2, 0, 1).copy()))
    with pytest.raises(ValueError, match="CUDA device"):
        nvjpeg_decoder(CPU)
