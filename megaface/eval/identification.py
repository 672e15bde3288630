"""MegaFace-style 1:N identification: probes against a labelled gallery plus (millions of) distractors.

The rank of a probe is 1 + the number of wrong candidates (gallery items of another identity, and every
distractor) whose cosine score is strictly above the probe's best genuine gallery score; ties go to the
genuine match. CMC(k) = fraction of probes with rank <= k; rank-1 = CMC(1).

Only counts are needed for CMC, not the ranked lists, so candidates stream through in blocks: each block of
probe x candidate scores is compared with the probes' genuine scores and reduced to a count at once. Peak
extra memory is one score block (`block_bytes`, 256 MiB by default) plus one normalised candidate block,
whatever the distractor count; distractors may be a memory-mapped `.npy` (`np.load(..., mmap_mode="r")`)
so 1M x 512 never has to sit in memory. For MegaFace itself: gallery = one image per FaceScrub identity,
probes = that identity's other images, distractors = the MegaFace set.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _blocks(num_rows: int, rows_per_block: int) -> Iterable[slice]:
    for s in range(0, num_rows, rows_per_block):
        yield slice(s, min(s + rows_per_block, num_rows))


def _block_rows(num_probes: int, block_bytes: int) -> int:
    return max(256, block_bytes // (4 * max(num_probes, 1)))


def genuine_scores(probe: np.ndarray, probe_labels: np.ndarray, gallery: np.ndarray,
                   gallery_labels: np.ndarray, block_bytes: int = 256 << 20) -> np.ndarray:
    """Best score of each (normalised) probe against the gallery items of its own identity."""
    best = np.full(len(probe), -np.inf, np.float32)
    for sl in _blocks(len(gallery), _block_rows(len(probe), block_bytes)):
        scores = probe @ _l2(gallery[sl]).T
        same = probe_labels[:, None] == gallery_labels[None, sl]
        best = np.maximum(best, np.where(same, scores, -np.inf).max(1))
    missing = np.isneginf(best)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} probes have no gallery image of their identity (e.g. label "
                         f"{int(probe_labels[missing][0])}); closed-set identification needs one per identity")
    return best


def count_above(probe: np.ndarray, genuine: np.ndarray, candidates: np.ndarray,
                candidate_labels: np.ndarray | None, probe_labels: np.ndarray,
                block_bytes: int = 256 << 20) -> np.ndarray:
    """Per probe: wrong candidates (other label, or any when labels are None) scoring above `genuine`."""
    counts = np.zeros(len(probe), np.int64)
    for sl in _blocks(len(candidates), _block_rows(len(probe), block_bytes)):
        above = (probe @ _l2(candidates[sl]).T) > genuine[:, None]
        if candidate_labels is not None:
            above &= probe_labels[:, None] != candidate_labels[None, sl]
        counts += above.sum(1)
    return counts


def identify(probe: np.ndarray, probe_labels: Sequence[int] | np.ndarray, gallery: np.ndarray,
             gallery_labels: Sequence[int] | np.ndarray, distractors: Sequence[np.ndarray] = (), max_rank: int = 10,
             block_bytes: int = 256 << 20) -> dict[str, Any]:
    """Rank-1 and CMC up to `max_rank` of probes against gallery + distractors (cosine similarity)."""
    probe_ids, gallery_ids = np.asarray(probe_labels), np.asarray(gallery_labels)
    if len(probe) != len(probe_ids) or len(gallery) != len(gallery_ids):
        raise ValueError(f"probe: {len(probe)} rows / {len(probe_ids)} labels; gallery: {len(gallery)} rows / "
                         f"{len(gallery_ids)} labels; every row needs one label")
    if len(probe) == 0 or len(gallery) == 0:
        raise ValueError("identification needs at least one probe and one gallery image")
    dims = {np.shape(probe)[1], np.shape(gallery)[1], *(np.shape(d)[1] for d in distractors)}
    if len(dims) != 1:
        raise ValueError(f"probe, gallery and distractor features differ in dimension: {sorted(dims)}; "
                         "extract them all with the same model")
    if max_rank < 1:
        raise ValueError(f"max_rank={max_rank} must be >= 1")
    p = _l2(probe)
    genuine = genuine_scores(p, probe_ids, gallery, gallery_ids, block_bytes)
    above = count_above(p, genuine, gallery, gallery_ids, probe_ids, block_bytes)
    for d in distractors:
        above += count_above(p, genuine, d, None, probe_ids, block_bytes)
    ranks = above + 1
    cmc = [float(np.mean(ranks <= k)) for k in range(1, max_rank + 1)]
    return {"rank1": cmc[0], "cmc": cmc, "ranks": ranks, "num_probes": len(p), "num_gallery": len(gallery),
            "num_distractors": int(sum(len(d) for d in distractors))}


def format_ident(result: dict[str, Any]) -> list[str]:
    cmc = result["cmc"]
    shown = [k for k in (1, 5, 10, 20, 50, 100) if k <= len(cmc)]
    return [f"Identification: {result['num_probes']} probes, {result['num_gallery']} gallery, "
            f"{result['num_distractors']} distractors",
            "Rank-1: %1.5f" % result["rank1"],
            "CMC: " + ", ".join(f"rank-{k} {cmc[k - 1]:.5f}" for k in shown)]
