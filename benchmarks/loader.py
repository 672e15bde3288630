"""Loader throughput: decoded + augmented images/s on 112x112 JPEGs from a RecordIO pack.

Prints one JSON line per case:
  {"case": "synthetic"}                synthetic-identity generation rate (one process, no JPEG);
  {"case": "decode", "decoder": ...}   raw single-thread decode rate of each available decoder on the pack's
                                        JPEG bytes (already in memory), RGB output;
  {"case": "loader", "workers": W, "path": P}
                                       TrainLoader images/s end to end, wall and per CPU-second (the process and
                                       its workers), and the bytes per image a copy to the device moves:
                                       path "cpu" = the former path (workers flip, this process normalises to
                                       float32 NCHW, 4 bytes a pixel cross to the device); path "device" = the
                                       training default (uint8 NCHW crosses; normalise runs on the device, timed
                                       here separately on this CPU as "prepare"); path "jpeg" = data.decode=gpu
                                       (workers read and check JPEG headers, the batch's JPEG bytes cross; the
                                       device's nvJPEG decode is not part of it: this is what the loader must
                                       sustain when the GPU decodes).

  python benchmarks/loader.py [--identities 100 --images-per-identity 20 --workers 0 1 2 --batch-size 64
                               --epochs 2]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import numpy as np


def _decoders() -> dict:
    import cv2

    from megaface.data.decode import decode_image

    cv2.setNumThreads(1)
    out = {
        "megaface.decode_image (chosen: simplejpeg if installed, else cv2)": decode_image,
        "cv2.imdecode + cvtColor (RGB)": lambda b: cv2.cvtColor(
            cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB),
        "cv2.imdecode (BGR, no conversion)": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
    }
    try:
        from PIL import Image

        out["PIL.Image.open + convert('RGB')"] = lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    except ImportError:
        pass
    try:
        import simplejpeg

        out["simplejpeg.decode_jpeg (RGB)"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")
    except ImportError:
        pass
    try:
        from turbojpeg import TurboJPEG

        tj = TurboJPEG()
        out["PyTurboJPEG (BGR)"] = tj.decode
    except Exception:  # noqa: BLE001 - not installed, or libturbojpeg missing
        pass
    return out


def bench_decode(blobs: list[bytes], seconds: float, rounds: int = 7) -> None:
    """Decoders take turns (round-robin) so that load changes on a shared machine hit them all alike;
    the best round is the least disturbed estimate, the median the typical one."""
    decoders = _decoders()
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    batch = blobs[:256]
    for _ in range(rounds):
        for name, fn in decoders.items():
            fn(batch[0])
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                for b in batch:
                    fn(b)
                n += len(batch)
            rates[name].append(n / (time.perf_counter() - start))
    for name, r in rates.items():
        print(json.dumps({"case": "decode", "decoder": name, "images_per_s_best": round(max(r), 1),
                          "images_per_s_median": round(float(np.median(r)), 1), "threads": 1}), flush=True)


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_loader(pack, workers: int, batch_size: int, epochs: int, path: str) -> None:
    import gc

    import torch

    from megaface.data import TrainLoader
    from megaface.data.augment import RawBatch, prepare_batch

    torch.set_num_threads(1)
    from megaface.data.device_decode import EncodedImages, host_decoder

    on_device = path in ("device", "jpeg")
    children_before = _children_cpu()
    loader = TrainLoader(pack, batch_size, workers=workers, seed=0, on_device=on_device,
                         device=torch.device("cpu") if on_device else None, decode="gpu" if path == "jpeg" else "cpu",
                         device_decoder=host_decoder if path == "jpeg" else None)
    if path == "jpeg":
        loader._copy = None  # hand the batches over as the workers send them: no host decoder in nvJPEG's place
    for _ in loader:  # warm-up epoch: worker start-up, page cache
        pass
    n, moved, prepare_s = 0, 0, 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for images, labels in loader:
            if isinstance(images, RawBatch) and isinstance(images.images, EncodedImages):
                moved += images.images.nbytes + labels.nbytes
                n += len(images)
                continue
            if isinstance(images, RawBatch):
                moved += images.images.nbytes + labels.nbytes
                t = time.perf_counter()
                images = prepare_batch(images, "arcface_torch")
                prepare_s += time.perf_counter() - t
            else:
                moved += images.nbytes + labels.nbytes
            n += images.shape[0]
    wall = time.perf_counter() - start
    main_cpu = time.process_time() - cpu_start
    loader.close()
    del loader
    gc.collect()
    time.sleep(0.5)  # let the worker processes exit so that their CPU time is counted
    cpu = main_cpu + (_children_cpu() - children_before)  # workers: includes their warm-up epoch
    print(json.dumps({"case": "loader", "workers": workers, "path": path, "batch_size": batch_size, "images": n,
                      "images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1),
                      "bytes_per_image_to_device": round(moved / n, 1),
                      "prepare_on_this_cpu_s_per_1k_images": round(1000 * prepare_s / n, 3),
                      "includes": "pread+decode+IPC (+flip+normalize on this CPU); workers=0 is inline; "
                                  "CPU-s of workers include their warm-up epoch"}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="where the synthetic pack is cached (default: a temp dir)")
    ap.add_argument("--identities", type=int, default=100)
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--decode-seconds", type=float, default=3.0)
    args = ap.parse_args()

    from megaface.data import open_pack
    from megaface.data.synthetic import ensure_synthetic

    root = args.root or tempfile.mkdtemp(prefix="megaface-bench-")
    from megaface.data.synthetic import generate

    start = time.perf_counter()
    generate(np.arange(128) // 4, np.arange(128) % 4, seed=1)
    rate = 128 / (time.perf_counter() - start)
    print(json.dumps({"case": "synthetic", "images_per_s": round(rate, 1), "size": 112, "processes": 1}), flush=True)
    start = time.perf_counter()
    pack_dir, _ = ensure_synthetic(root, args.identities, args.images_per_identity, val_pairs=0, seed=0)
    pack = open_pack(pack_dir)
    print(json.dumps({"case": "pack", "images": len(pack), "seconds": round(time.perf_counter() - start, 1),
                      "mean_jpeg_bytes": int(np.mean([len(pack[i][1]) for i in range(min(len(pack), 500))]))}),
          flush=True)
    blobs = [pack[i][1] for i in range(min(len(pack), 512))]
    bench_decode(blobs, args.decode_seconds)
    for w in args.workers:
        for path in ("cpu", "device", "jpeg"):  # the former path, the default and decode=gpu, alternating
            bench_loader(pack, w, args.batch_size, args.epochs, path)


if __name__ == "__main__":
    main()
