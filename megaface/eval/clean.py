"""`megaface clean`: drop the training samples far from their class's dominant sub-center, then the classes
left too small, and write the cleaned pack (sub-center ArcFace, Deng et al., ECCV 2020: train with K
sub-centers, keep each class's dominant one, drop samples more than 75 degrees from it, retrain with K = 1).

| step                                   | shape / values                                                |
|----------------------------------------|---------------------------------------------------------------|
| FC7 of the checkpoint (shards merged)  | weight [C*K, D]; class c owns rows c*K .. c*K+K-1             |
| backbone on every training image       | emb [N, D] (no flip: the head saw the images' own embeddings) |
| nearest sub-center of the own class    | nearest [N] in 0..K-1 (max cosine over the class's K rows)    |
| dominant sub-center of each class      | dominant [C]: the one most of its samples are nearest to      |
|                                        | (ties: the lowest index; a class without samples: 0)          |
| angle to the own class's dominant row  | angle [N] degrees, arccos of the cosine clipped to [-1, 1]    |
| keep                                   | angle <= threshold, and the class keeps >= min_images samples  |
| new labels                             | kept classes renumbered 0.. in their original order           |

Everything here is a pure function of arrays except `read_fc7` (checkpoint files) and the writers.
The output directory gets the pack (RecordIO: train.rec/.idx/property; OFRecord: part-* files; image bytes
copied as they are, never re-encoded) and, beside it, `clean.json` (the report), `clean_source_index.npy`
(int64 [kept]: the source-pack position of each written record, in written order) and `clean_angles.png`
(histogram of the angles with the threshold marked; needs the `plot` extra).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from megaface.checkpoint import DS_DIR, FC7_DIR, read_meta
from megaface.checkpoint.fc7_shards import load_checkpoint_shards, merge_shards, subcenters_of
from megaface.fileio import atomic_output_file, atomic_write_text, save_npy
from megaface.utils.progress import Progress
from megaface.vocab import CLEAN_FORMATS, CleanFormat

DEFAULT_THRESHOLD_DEG = 75.0
"""The paper's threshold: a sample further than this from its class's dominant sub-center is dropped."""
DEFAULT_MIN_IMAGES = 2
"""Classes left with fewer images are dropped (megaface's choice; the paper gives no number)."""
REPORT_FILE = "clean.json"
SOURCE_INDEX_FILE = "clean_source_index.npy"
HISTOGRAM_FILE = "clean_angles.png"
_BLOCK = 65536  # samples per block of the cosine computation: [block, K, D] stays a few hundred MB at D = 512


# ---- the FC7 of a checkpoint ---------------------------------------------------------------------------------

def read_fc7(tag_dir: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """(weight [C*K, D] float32 in class order, K) of a checkpoint: its FC7 shards merged (model-parallel
    head), or the DeepSpeed checkpoint's `head.weight` (data-parallel head). Digests are the caller's job."""
    tag_dir = Path(tag_dir)
    meta = read_meta(tag_dir)
    if meta.get("parallel") == "data" and not (tag_dir / FC7_DIR).is_dir():
        from megaface.checkpoint.backbone import strip_wrappers
        from megaface.checkpoint.zero_reader import read_fp32_state_dict

        state = strip_wrappers(read_fp32_state_dict(tag_dir / DS_DIR)[0])
        if "head.weight" not in state:
            raise ValueError(f"{tag_dir / DS_DIR}: no 'head.weight' although meta.json says parallel='data'")
        return state["head.weight"].float(), int(meta.get("subcenters", 1))
    states, names = load_checkpoint_shards(tag_dir)
    merged = merge_shards(states, names)
    return merged["weight"].float(), subcenters_of(merged)


def check_subcenters(k: int, where: str | os.PathLike) -> None:
    if k < 2:
        raise ValueError(f"{where}: its FC7 has head.subcenters={k}; `megaface clean` needs a sub-center model "
                         "(K >= 2 rows per class) to find each class's dominant sub-center: train with "
                         "--head.subcenters=3 first")


# ---- the definition, on arrays -------------------------------------------------------------------------------

def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _class_rows(weight: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[n, K, D]: the K rows of each sample's own class."""
    rows = labels[:, None] * k + torch.arange(k)
    return weight[rows]


def subcenter_cosines(emb: np.ndarray, labels: np.ndarray, weight: torch.Tensor, k: int) -> np.ndarray:
    """float32 [N, K]: cosine of each sample to each of its own class's K sub-centers (computed in blocks)."""
    num_classes = weight.shape[0] // k
    if weight.shape[0] != num_classes * k:
        raise ValueError(f"FC7 has {weight.shape[0]} rows, not a multiple of subcenters={k}")
    if emb.shape[1] != weight.shape[1]:
        raise ValueError(f"the backbone gives {emb.shape[1]}-d embeddings but the FC7 rows are "
                         f"{weight.shape[1]}-d: the backbone and the FC7 come from different runs")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(f"pack record {int(bad[0])} has label {int(labels[bad[0]])} outside the checkpoint's "
                         f"{num_classes} classes: clean the pack the model was trained on")
    w = _unit(weight)
    out = np.empty((len(labels), k), np.float32)
    for lo in range(0, len(labels), _BLOCK):
        e = _unit(torch.from_numpy(np.ascontiguousarray(emb[lo:lo + _BLOCK])))
        rows = _class_rows(w, torch.from_numpy(labels[lo:lo + _BLOCK].astype(np.int64)), k)
        out[lo:lo + _BLOCK] = torch.einsum("nd,nkd->nk", e, rows).numpy()
    return out


def dominant_subcenters(cosines: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C]: per class, the sub-center most of its samples are nearest to (ties: the lowest index)."""
    k = cosines.shape[1]
    nearest = cosines.argmax(axis=1)
    votes = np.zeros((num_classes, k), np.int64)
    np.add.at(votes, (labels, nearest), 1)
    return votes.argmax(axis=1)  # first maximum: the lowest index wins a tie; an empty class gets 0


def angles_to_dominant(cosines: np.ndarray, labels: np.ndarray, dominant: np.ndarray) -> np.ndarray:
    """float64 [N]: degrees between each sample and its class's dominant sub-center."""
    cos = cosines[np.arange(len(labels)), dominant[labels]].astype(np.float64)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


@dataclass(frozen=True)
class CleanPlan:
    """What to keep: `keep` bool [N]; `new_label` int64 [C] (-1: class dropped); the counts of the report."""

    keep: np.ndarray
    far: np.ndarray           # bool [N]: dropped for the angle
    small: np.ndarray         # bool [N]: within the threshold but in a class left too small
    new_label: np.ndarray
    classes_in: int           # classes with at least one sample in the source pack
    small_classes: int        # of those, dropped because fewer than min_images samples were left

    def order(self, labels: np.ndarray) -> np.ndarray:
        """int64 [kept]: source positions in written order (new label, then source position)."""
        kept = np.flatnonzero(self.keep)
        return kept[np.argsort(self.new_label[labels[kept]], kind="stable")]


def check_options(threshold_deg: float, min_images: int) -> None:
    if not 0.0 < threshold_deg <= 180.0:
        raise ValueError(f"--threshold-deg {threshold_deg} must lie in (0, 180] degrees (the paper: 75)")
    if min_images < 1:
        raise ValueError(f"--min-images {min_images} must be >= 1")


def plan_clean(angles: np.ndarray, labels: np.ndarray, num_classes: int, threshold_deg: float = DEFAULT_THRESHOLD_DEG,
               min_images: int = DEFAULT_MIN_IMAGES) -> CleanPlan:
    """Drop samples with angle > threshold_deg, then classes left with fewer than min_images samples."""
    check_options(threshold_deg, min_images)
    far = angles > threshold_deg
    left = np.bincount(labels[~far], minlength=num_classes)
    present = np.bincount(labels, minlength=num_classes) > 0
    big = left >= min_images
    small = ~far & ~big[labels]
    new_label = np.where(big, np.cumsum(big) - 1, -1).astype(np.int64)
    return CleanPlan(keep=~far & big[labels], far=far, small=small, new_label=new_label,
                     classes_in=int(present.sum()), small_classes=int((present & ~big).sum()))


# ---- writing -------------------------------------------------------------------------------------------------

def pack_format(pack: Any) -> CleanFormat:
    """The format a source pack was read from: OFRecord parts or RecordIO (a pack or a shards.json)."""
    from megaface.data.ofrecord import OFRecordDataset

    return "ofrecord" if isinstance(pack, OFRecordDataset) else "recordio"


def _records(pack: Any, order: np.ndarray, labels: np.ndarray, new_label: np.ndarray,
             bar: Progress) -> Iterator[tuple[int, bytes]]:
    for i in order:
        _, image = pack[int(i)]
        bar.update(1)
        yield int(new_label[labels[i]]), image


def write_pack(pack: Any, plan: CleanPlan, labels: np.ndarray, output: str | os.PathLike, fmt: CleanFormat,
               progress: bool = True) -> np.ndarray:
    """Write the kept records of `pack` to a new `output` in `fmt`; returns their source positions (written order).
    (The command writes it into a staging directory and replaces an existing output as a whole, with --force.)"""
    from megaface.data.decode import decode_image
    from megaface.data.ofrecord import encode_record
    from megaface.data.ofrecord_pack import write_parts
    from megaface.data.packs import PackWriter

    if fmt not in CLEAN_FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(CLEAN_FORMATS)}")
    order = plan.order(labels)
    if order.size == 0:
        raise ValueError("nothing is left after cleaning: every sample is beyond --threshold-deg or in a class "
                         "smaller than --min-images; raise the threshold or lower --min-images")
    with Progress("clean: write", int(order.size), "images", enabled=progress) as bar:
        records = _records(pack, order, labels, plan.new_label, bar)
        if fmt == "ofrecord":
            write_parts(output, int(order.size), (encode_record({"encoded": img, "label": lab}) for lab, img in records))
        else:
            # an OFRecord source does not know its image size without decoding one image
            size = getattr(pack, "image_size", None) or decode_image(pack[int(order[0])][1]).shape[:2]
            with PackWriter(output, (int(size[0]), int(size[1]))) as writer:
                for lab, img in records:
                    writer.add(lab, img)
    return order


def report(plan: CleanPlan, angles: np.ndarray, dominant: np.ndarray, labels: np.ndarray, k: int,
           threshold_deg: float, min_images: int, **where: Any) -> dict[str, Any]:
    """The numbers of a cleaning (JSON-ready). `where`: source, checkpoint, output, format."""
    kept_classes = int((plan.new_label >= 0).sum())
    present = np.bincount(labels, minlength=len(dominant)) > 0
    return {
        **where, "threshold_deg": threshold_deg, "min_images": min_images, "subcenters": k,
        "samples_in": int(len(labels)), "samples_out": int(plan.keep.sum()),
        "samples_dropped": {"angle": int(plan.far.sum()), "small_class": int(plan.small.sum())},
        "classes_in": plan.classes_in, "classes_out": kept_classes,
        "classes_dropped": {"small_class": plan.small_classes},
        "dominant_subcenter_classes": np.bincount(dominant[present], minlength=k).tolist(),
        "angle_deg": {"min": float(angles.min()), "median": float(np.median(angles)), "max": float(angles.max())},
    }


def noise_score(pack_dir: str | os.PathLike, plan: CleanPlan) -> dict[str, Any] | None:
    """How the cleaning did against a synthetic pack's truth (its noise.json, `megaface pack synthetic
    --mislabel-share`): mislabelled and correctly labelled records dropped. None when there is no noise.json."""
    from megaface.data.synthetic_noise import NOISE_FILE

    path = Path(pack_dir) / NOISE_FILE
    if not path.is_file():
        return None
    truth = json.loads(path.read_text())
    if int(truth.get("records", -1)) != len(plan.keep):
        raise ValueError(f"{path} describes {truth.get('records')} records but the pack holds {len(plan.keep)}: "
                         "it belongs to another pack; remove it or regenerate the pack")
    wrong = np.zeros(len(plan.keep), bool)
    wrong[np.asarray(truth["mislabelled"]["index"], np.int64)] = True
    low = np.zeros(len(plan.keep), bool)
    low[np.asarray(truth.get("low_quality_index", []), np.int64)] = True
    dropped = ~plan.keep
    return {"file": NOISE_FILE, "mislabelled": int(wrong.sum()), "mislabelled_dropped": int((dropped & wrong).sum()),
            "correct": int((~wrong).sum()), "correct_dropped": int((dropped & ~wrong).sum()),
            "low_quality": int(low.sum()), "low_quality_dropped": int((dropped & low).sum())}


def plot_angles(angles: np.ndarray, threshold_deg: float, path: str | os.PathLike) -> Path:
    """Histogram of the angles (1-degree bins) with the threshold marked; matplotlib (the `plot` extra)."""
    import matplotlib  # an optional package: the caller names the extra that installs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(angles, bins=list(range(181)), color="tab:blue")
    ax.axvline(threshold_deg, color="tab:red", linestyle="--", label=f"threshold {threshold_deg:g} deg")
    ax.set_xlabel("angle to the class's dominant sub-center (degrees)")
    ax.set_ylabel("samples")
    ax.set_yscale("log")
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_output_file(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def write_outputs(output: Path, order: np.ndarray, summary: dict[str, Any], angles: np.ndarray,
                  threshold_deg: float) -> dict[str, Any]:
    """clean.json, clean_source_index.npy and the histogram beside the written pack; returns the report."""
    save_npy(output / SOURCE_INDEX_FILE, order.astype(np.int64))
    try:
        plot_angles(angles, threshold_deg, output / HISTOGRAM_FILE)
        summary["histogram"] = HISTOGRAM_FILE
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "matplotlib":
            raise
        summary["histogram"] = None
        warnings.warn("no angle histogram: matplotlib is not installed: pip install 'megaface[plot]'",
                      UserWarning, stacklevel=2)
    atomic_write_text(output / REPORT_FILE, json.dumps(summary, indent=2) + "\n", fsync=False)
    return summary
