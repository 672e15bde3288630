"""`megaface pack rec` throughput: images/s with 1 and 2 worker processes in the same run, bytes written, and
the projected time for MS1M (5.8M images) and WebFace42M (42M) per core count.

Synthetic face-like 112x112 JPEGs (megaface.data.synthetic, q95, ~4-5 KB like MS1M's) are written to a folder
once; then the packs are made in alternating rounds (1, 2, 1, 2, ...) so that a change of load on a shared
machine hits both counts alike. Every pack is compared byte for byte with the first one. Prints JSON lines:

  {"case": "pack", "workers": W, "round": R, "images_per_s": ..., "cpu_s": ..., "bytes": ...}
  {"case": "summary", "images_per_s": {W: median}, "speedup_2_vs_1": (median of the per-round ratios),
   "speedup_per_round": [...], "ratio_of_medians": ..., "identical": true, "load": "..."}
  {"case": "projection", "cores": C, "images_per_s": ..., "ms1m_h": ..., "webface42m_h": ...}
                              (from CPU seconds per image: see the comment in main)

  PYTHONPATH=$PWD python benchmarks/pack.py [--identities 400 --images-per-identity 20 --rounds 3
                                             --workers 1 2 --quality Q --no-verify]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

DATASETS = {"ms1m": 5_822_653, "webface42m": 42_474_557}
"""Image counts: MS1M-RetinaFace (faces_emore-like) and WebFace42M."""


def make_images(root: Path, identities: int, per_identity: int, seed: int = 0) -> int:
    """Writes the JPEGs once; a --dir that holds them from an earlier run with the same sizes is reused."""
    from megaface.data.decode import encode_jpeg
    from megaface.data.synthetic import generate

    stamp = root / f".made_{identities}x{per_identity}_seed{seed}"
    if stamp.is_file():
        return identities * per_identity
    shutil.rmtree(root, ignore_errors=True)
    for i in range(identities):
        folder = root / f"{i:06d}"
        folder.mkdir(parents=True)
        faces = generate(np.full(per_identity, i), np.arange(per_identity), seed)
        for j, face in enumerate(faces):
            (folder / f"{j}.jpg").write_bytes(encode_jpeg(face, 95))
    stamp.touch()
    return identities * per_identity


def cpu_seconds() -> tuple[float, float]:
    """(this process, its finished children): user + system seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def pack_once(images: Path, output: Path, workers: int, options) -> tuple[float, float, float, dict]:
    """-> (wall s, parent CPU s, workers' CPU s, summary)."""
    from megaface.data.image_list import from_folder
    from megaface.data.pack_rec import pack_images

    listed = from_folder(images)  # listing is part of a real run, but the same for every worker count
    shutil.rmtree(output, ignore_errors=True)
    (own, children), start = cpu_seconds(), time.perf_counter()
    summary = pack_images(listed, output, options, workers=workers, progress="off")
    wall = time.perf_counter() - start
    own_after, children_after = cpu_seconds()
    return wall, own_after - own, children_after - children, summary


def pack_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=400)
    ap.add_argument("--images-per-identity", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quality", type=int, default=None, help="re-encode as JPEG at this quality")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--cores", type=int, nargs="+", default=[1, 2, 8, 16, 32, 64])
    ap.add_argument("--dir", default=None, help="working directory, kept (its images are reused by a later run "
                    "with the same sizes); default: a temporary one, removed")
    args = ap.parse_args()
    from megaface.data.pack_rec import PackOptions, default_workers

    options = PackOptions(verify=not args.no_verify, quality=args.quality)
    work = Path(args.dir or tempfile.mkdtemp(prefix="megaface_pack_bench_"))
    count = make_images(work / "images", args.identities, args.images_per_identity)
    reference, rates = None, {w: [] for w in args.workers}
    cpu_per_image: dict[int, list[tuple[float, float]]] = {w: [] for w in args.workers}  # (parent, all)
    for r in range(args.rounds):
        for w in args.workers:
            wall, parent, children, summary = pack_once(work / "images", work / f"pack_w{w}", w, options)
            files = pack_files(work / f"pack_w{w}")
            reference = reference or files
            rates[w].append(count / wall)
            cpu_per_image[w].append((parent / count, (parent + children) / count))
            print(json.dumps({"case": "pack", "workers": w, "round": r, "images": count,
                              "images_per_s": round(count / wall, 1), "wall_s": round(wall, 3),
                              "parent_cpu_s": round(parent, 3), "workers_cpu_s": round(children, 3),
                              "images_per_cpu_s": round(count / (parent + children), 1),
                              "bytes": summary["bytes"], "identical": files == reference}), flush=True)
            if files != reference:
                raise SystemExit(f"pack with {w} workers differs from the first pack: the output is not deterministic")
    median = {w: statistics.median(v) for w, v in rates.items()}
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    # The rounds alternate 1, 2, 1, 2, ...: the ratio within a round compares the two counts under the same
    # load, and its median over the rounds is the speed-up (the ratio of the two medians mixes rounds).
    paired = [b / a for a, b in zip(rates[1], rates[2], strict=True)] if 1 in rates and 2 in rates else []
    speedup = statistics.median(paired) if paired else None
    print(json.dumps({"case": "summary", "images": count, "images_per_s": {w: round(v, 1) for w, v in median.items()},
                      "speedup_2_vs_1": round(speedup, 3) if speedup else None,
                      "speedup_per_round": [round(r, 3) for r in paired],
                      "ratio_of_medians": round(median[2] / median[1], 3) if paired else None, "identical": True,
                      "bytes": sum(len(b) for b in reference.values()), "cores_available": default_workers(),
                      "options": {"verify": options.verify, "quality": options.quality}, "load": load}), flush=True)
    # Projection from CPU time, which a shared machine does not distort the way it distorts wall time: on C
    # dedicated cores the workers pack C / (CPU s per image, parent included) images/s, until the parent
    # (append bytes and index lines, journal) is the bottleneck at 1 / (parent CPU s per image). Storage
    # that keeps up is assumed (these packs were written to the page cache).
    one = statistics.median(all_ for _, all_ in cpu_per_image[min(args.workers)])
    many = max(args.workers)
    parallel = statistics.median(all_ for _, all_ in cpu_per_image[many])
    parent = statistics.median(p for p, _ in cpu_per_image[many])
    for cores in args.cores:
        rate = 1 / one if cores == 1 else min(cores / parallel, 1 / parent)
        print(json.dumps({"case": "projection", "cores": cores, "images_per_s": round(rate),
                          "bound": "workers" if cores == 1 or cores / parallel < 1 / parent else "parent",
                          **{f"{name}_h": round(n / rate / 3600, 2) for name, n in DATASETS.items()}}), flush=True)
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
