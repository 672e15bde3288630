"""Evaluation benchmarks; one JSON line per case, each with a naive baseline measured in the same run.

  python benchmarks/eval.py [--pairs 6000] [--dim 512] [--images 256] [--network mobilefacenet]
                            [--probes 1000] [--distractors 100000] [--threads N]

Cases:
  verification  evaluate() on P pairs (Accuracy-Flip + no-flip + VAL@FAR) vs a per-threshold loop
  embed         embed_images() images/s (flip on, batched) vs one image per forward call
  identify      chunked 1:N identification vs the full score matrix (and its peak extra memory)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaface.distributed import DistState  # noqa: E402
from megaface.eval import identification, verification  # noqa: E402
from megaface.eval.embed import embed_images  # noqa: E402


def _emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _pairs(pairs: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = (np.arange(pairs) // 300) % 2 == 0  # LFW layout: blocks of 300
    a = rng.normal(size=(pairs, dim)).astype(np.float32)
    # noise 8x the signal: accuracy well below 1, so thresholds and folds matter
    b = np.where(issame[:, None], a, rng.normal(size=(pairs, dim))) + 8.0 * rng.normal(size=(pairs, dim))
    emb = np.empty((2 * pairs, dim), np.float32)
    emb[0::2], emb[1::2] = a, b
    return emb, emb + 0.2 * rng.normal(size=emb.shape).astype(np.float32), issame


def _naive_protocol(dist: np.ndarray, issame: np.ndarray, folds: int = 10) -> tuple[list[float], float]:
    """Baseline: every fold, every threshold, a full pass over the pairs (accuracy, then VAL@FAR=1e-3)."""
    bounds = verification.fold_bounds(len(dist), folds)
    accs, vals = [], []
    for start, stop in bounds:
        test = np.zeros(len(dist), bool)
        test[start:stop] = True
        train_acc = [np.mean((dist[~test] < t) == issame[~test]) for t in verification.ACC_THRESHOLDS]
        best = verification.ACC_THRESHOLDS[int(np.argmax(train_acc))]
        accs.append(float(np.mean((dist[test] < best) == issame[test])))
        neg = ~issame & ~test
        far = np.array([np.sum(dist[neg] < t) / neg.sum() for t in verification.VAL_THRESHOLDS])
        thr = verification.far_to_threshold(far, verification.VAL_THRESHOLDS, 1e-3)
        vals.append(float(np.mean(dist[test & issame] < thr)))
    return accs, float(np.mean(vals))


def bench_verification(pairs: int, dim: int) -> None:
    from sklearn.preprocessing import normalize

    emb, flip, issame = _pairs(pairs, dim)
    t0 = time.perf_counter()
    verification.evaluate(emb, flip, issame)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = verification.evaluate(emb, flip, issame)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused = normalize(emb.astype(np.float64) + flip)
    naive_accs, _ = _naive_protocol(verification.pair_distances(fused), issame)
    naive_seconds = time.perf_counter() - t0
    _emit(case="verification", pairs=pairs, dim=dim, seconds=round(seconds, 4), first_call_seconds=round(first, 4),
          includes="Accuracy-Flip + no-flip accuracy + VAL@FAR + best threshold",
          baseline="per-threshold loop (Accuracy-Flip + VAL@FAR)", baseline_seconds=round(naive_seconds, 4),
          speedup=round(naive_seconds / seconds, 1), same_fold_accuracies=naive_accs == result["accuracies"],
          accuracy=round(result["accuracy"], 5))


def _encoded_images(n: int) -> list[bytes]:
    import cv2

    rng = np.random.default_rng(0)
    return [cv2.imencode(".jpg", rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))[1].tobytes()
            for _ in range(n)]


def bench_embed(n: int, network: str, batch_size: int) -> None:
    from megaface.models import build_model

    model = build_model(network).eval()
    images = _encoded_images(n)
    embed_images(model, images[:batch_size], DistState(), batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    embed_images(model, images, DistState(), batch_size=batch_size, flip=True)
    seconds = time.perf_counter() - t0
    few = images[: max(8, n // 8)]
    t0 = time.perf_counter()
    embed_images(model, few, DistState(), batch_size=1, flip=True)  # baseline: one image per call
    naive_seconds = time.perf_counter() - t0
    _emit(case="embed", network=network, images=n, batch_size=batch_size, flip=True,
          images_per_s=round(n / seconds, 1), baseline="batch_size=1",
          baseline_images_per_s=round(len(few) / naive_seconds, 1),
          speedup=round((n / seconds) / (len(few) / naive_seconds), 2), threads=torch.get_num_threads())


def bench_identify(probes: int, distractors: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    ids = probes // 2
    centres = rng.normal(size=(ids, dim)).astype(np.float32)
    gallery, gl = centres + 0.5 * rng.normal(size=centres.shape).astype(np.float32), np.arange(ids)
    pl = np.repeat(np.arange(ids), 2)
    # probe noise 5x the identity signal: rank-1 well below 1 against 100k random distractors
    probe = centres[pl] + 5.0 * rng.normal(size=(len(pl), dim)).astype(np.float32)
    dis = rng.normal(size=(distractors, dim)).astype(np.float32)
    block = 64 << 20
    t0 = time.perf_counter()
    result = identification.identify(probe, pl, gallery, gl, [dis], block_bytes=block)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()  # baseline: the whole probe x candidate matrix at once
    n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cand = np.concatenate([n(gallery), n(dis)])
    scores = n(probe) @ cand.T
    labels = np.concatenate([gl, np.full(distractors, -1)])
    genuine = np.where(labels[None, :] == pl[:, None], scores, -np.inf).max(1)
    ranks = 1 + ((scores > genuine[:, None]) & (labels[None, :] != pl[:, None])).sum(1)
    naive_seconds = time.perf_counter() - t0
    _emit(case="identify", probes=len(pl), gallery=ids, distractors=distractors, dim=dim,
          seconds=round(seconds, 3), block_mib=block >> 20, baseline="full score matrix",
          baseline_seconds=round(naive_seconds, 3), baseline_matrix_mib=round(scores.nbytes / 2**20, 1),
          same_ranks=bool((ranks == result["ranks"]).all()), rank1=round(result["rank1"], 5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--network", default="mobilefacenet")
    parser.add_argument("--batch-size", type=int, default=32, help="CPU caches favour 32 over 64")
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--distractors", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", nargs="+", default=["verification", "embed", "identify"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "verification" in args.cases:
        bench_verification(args.pairs, args.dim)
    if "embed" in args.cases:
        bench_embed(args.images, args.network, args.batch_size)
    if "identify" in args.cases:
        bench_identify(args.probes, args.distractors, args.dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
