"""`megaface eval | embed | eval-ijb | eval-ident | clean`.

`eval`, `embed`, `clean` and `eval-ijb --checkpoint` run a model and work under any launcher (plain python,
torchrun, deepspeed, mpirun): every rank embeds its share, rank 0 scores and writes. `eval-ijb --features` and
`eval-ident` score saved features in one process. `clean` (its logic: megaface.eval.clean) writes a cleaned
training pack.

Files written by `embed --output out.npy`:
  out.npy          float32 [N, D] (embedding of each image; + the flipped image's with --flip-fuse)
  out.labels.npy   int64 [N]: identity label (-1 where unknown: loose images, .bin packs)
  out.paths.txt    one line per row: the image path, `<pack dir>:<index>` or `<bin file>:<index>`
  out.issame.npy   bool [N/2] (only for a .bin input)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np

from megaface.fileio import atomic_output_files, atomic_write_text, make_temp_dir, replace_dir, save_npy, save_text
from megaface.vocab import CLEAN_FORMATS, IJB_POOLINGS, IMAGE_SUFFIXES, NORMALIZE_MODES, PROGRESS_MODES, IjbPooling

# ---- shared helpers ----------------------------------------------------------------------------------

def load_model(checkpoint: str, network: str | None, embedding_size: int | None,
               verify: bool = True) -> tuple[Any, dict]:
    """The backbone at `checkpoint` (eval mode, CPU; sha256 digests verified unless `verify` is off), checked
    against the requested network / size."""
    from megaface.checkpoint import load_backbone

    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist (give an output dir, a "
                                "checkpoints dir, a tag dir or a backbone .pt/.safetensors file)")
    model, meta = load_backbone(checkpoint, network=network, verify=verify)
    actual = getattr(model, "embedding_size", None) or meta.get("embedding_size")
    if embedding_size is not None and actual is not None and int(actual) != embedding_size:
        raise ValueError(f"{checkpoint} produces {actual}-d embeddings, not --embedding-size {embedding_size}; "
                         "pass the matching checkpoint or drop --embedding-size")
    return model, dict(meta)


def _model_args(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    if checkpoint:  # eval-ijb adds its own: --checkpoint or --features
        parser.add_argument("--checkpoint", required=True,
                            help="output dir, checkpoints dir, tag dir or backbone file")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="use the checkpoint without checking its sha256 digests (a warning says so)")
    parser.add_argument("--network", default=None, help="network name (required when the file has no meta)")
    parser.add_argument("--embedding-size", type=int, default=None, help="fail unless the model has this size")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward call and rank")
    parser.add_argument("--normalize", choices=NORMALIZE_MODES, default=None,
                        help="pixel normalisation (default: the checkpoint's, else arcface_torch)")


def _start(args: argparse.Namespace) -> tuple[Any, Any, str, dict, bool]:
    """Join the job, load the model onto this rank's device; -> state, model, normalize, meta, owns group."""
    import torch.distributed as dist

    from megaface.distributed import init_distributed

    owns_group = not dist.is_initialized()
    state = init_distributed()
    model, meta = load_model(args.checkpoint, args.network, args.embedding_size, verify=args.verify)
    normalize = args.normalize or meta.get("normalize") or "arcface_torch"
    return state, model.to(state.device), normalize, meta, owns_group


def _finish(owns_group: bool) -> None:
    if owns_group:
        from megaface.distributed import shutdown

        shutdown()


def _write_json(path: str | None, report: dict) -> None:
    if path:
        atomic_write_text(path, json.dumps(report, indent=2) + "\n", fsync=False)


def _sidecar(output: Path, suffix: str) -> Path:
    return output.with_name(output.name[: -len(".npy")] + suffix if output.name.endswith(".npy")
                            else output.name + suffix)


# ---- megaface eval -----------------------------------------------------------------------------------

def main_eval(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="megaface eval", description="verification on .bin packs")
    _model_args(parser)
    parser.add_argument("--bin", nargs="+", required=True,
                        help="verification packs: .bin files or OFRecord directories (lfw.bin cfp_fp/ ...)")
    parser.add_argument("--folds", type=int, default=10, help="cross-validation folds (10 in the protocol)")
    parser.add_argument("--json", default=None, help="write a JSON report here")
    parser.add_argument("--roc", default=None, help="draw the ROC curves into this image (png/pdf/svg)")
    args = parser.parse_args(list(argv))
    from megaface.eval.embed import embed_images
    from megaface.eval.roc import plot_roc
    from megaface.eval.validation import pack_name, read_bin
    from megaface.eval.verification import evaluate, format_result, json_summary

    names = [pack_name(p) for p in args.bin]
    if len(set(names)) != len(names):
        raise ValueError(f"--bin packs share a name: {names}; each pack needs a distinct file name")
    packs = [(name, *read_bin(p)) for name, p in zip(names, args.bin, strict=False)]  # all checked before the model loads
    state, model, normalize, meta, owns_group = _start(args)
    try:
        report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "network": meta.get("network"),
                                  "embedding_size": getattr(model, "embedding_size", None),
                                  "normalize": normalize, "world_size": state.world_size, "packs": {}}
        curves = {}
        for name, images, issame in packs:
            emb, emb_flip = embed_images(model, images, state, args.batch_size, normalize, flip=True,
                                         progress=f"eval {name}")
            if not state.is_main:
                continue
            result = evaluate(emb, emb_flip, issame, args.folds)
            print("\n".join(format_result(name, result)), flush=True)
            report["packs"][name] = json_summary(result)
            curves[name] = (result["fpr"], result["tpr"])
        if state.is_main:
            _write_json(args.json, report)
            if args.roc:
                plot_roc(curves, args.roc, title="Verification ROC (mean of test folds)")
    finally:
        _finish(owns_group)
    return 0


# ---- megaface embed ----------------------------------------------------------------------------------

class _LazyFiles:
    """Image files read on access (each rank reads only its share)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        return self.paths[i].read_bytes()


class _PackImages:
    def __init__(self, pack: Any) -> None:
        self.pack = pack

    def __len__(self) -> int:
        return len(self.pack)

    def __getitem__(self, i: int) -> bytes:
        return self.pack[i][1]


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray]:
    """Images under `root` (recursive, sorted). Labels: the sorted identity sub-folder index when every
    image sits in a direct sub-folder (`root/<identity>/*.jpg`), else -1."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"--images {root} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    if all(p.parent.parent == root for p in paths):
        names = sorted({p.parent.name for p in paths})
        index = {n: i for i, n in enumerate(names)}
        return paths, np.array([index[p.parent.name] for p in paths], np.int64)
    return paths, np.full(len(paths), -1, np.int64)


def _embed_source(args: argparse.Namespace) -> tuple[Any, np.ndarray, list[str], np.ndarray | None]:
    """-> images (lazy sequence), labels, path strings, issame (for a .bin)."""
    if args.images:
        paths, labels = list_image_folder(args.images)
        return _LazyFiles(paths), labels, [str(p) for p in paths], None
    if args.pack:
        from megaface.data import build_dataset

        pack = build_dataset("recordio", args.pack)  # a pack directory, OFRecord parts or a shards.json
        return _PackImages(pack), np.asarray(pack.labels(), np.int64), \
            [f"{args.pack}:{i}" for i in range(len(pack))], None
    from megaface.eval.validation import read_bin

    images, issame = read_bin(args.bin)
    return images, np.full(len(images), -1, np.int64), [f"{args.bin}:{i}" for i in range(len(images))], \
        np.asarray(issame, bool)


def _save_embedding(output: Path, emb: np.ndarray, labels: np.ndarray, paths: list[str],
                    issame: np.ndarray | None) -> None:
    """The .npy and its sidecars, all or nothing (a full disk leaves the previous set intact)."""
    names = [output, _sidecar(output, ".labels.npy"), _sidecar(output, ".paths.txt")]
    arrays: list[Any] = [emb, labels, None]
    if issame is not None:
        names.append(_sidecar(output, ".issame.npy"))
        arrays.append(issame)
    with atomic_output_files(names) as tmps:
        for tmp, array in zip(tmps, arrays, strict=False):
            if array is None:
                save_text(tmp, "".join(p + "\n" for p in paths))
            else:
                save_npy(tmp, array)


def main_embed(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="megaface embed", description="embeddings to .npy")
    _model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder (root/<identity>/*.jpg, or loose images)")
    source.add_argument("--pack", help="RecordIO pack folder (train.rec/train.idx) or OFRecord part-* folder")
    source.add_argument("--bin", help="verification .bin pack or OFRecord verification folder")
    parser.add_argument("--output", required=True, help="output .npy (labels/paths written beside it)")
    parser.add_argument("--flip-fuse", action="store_true", help="add the horizontally flipped image's embedding")
    args = parser.parse_args(list(argv))
    from megaface.eval.embed import embed_images

    output = Path(args.output)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"--output {output}: folder {output.parent} does not exist")
    images, labels, paths, issame = _embed_source(args)
    state, model, normalize, _, owns_group = _start(args)
    try:
        emb, emb_flip = embed_images(model, images, state, args.batch_size, normalize, flip=args.flip_fuse,
                                     progress="embed")
        if state.is_main:
            _save_embedding(output, (emb + emb_flip) if args.flip_fuse else emb, labels, paths, issame)
            print(f"wrote {output} {tuple(emb.shape)} (+ labels, paths)", flush=True)
    finally:
        _finish(owns_group)
    return 0


# ---- megaface clean ----------------------------------------------------------------------------------

def main_clean(argv: Sequence[str]) -> int:
    from megaface.eval import clean

    parser = argparse.ArgumentParser(prog="megaface clean", description="drop training samples far from their "
                                     "class's dominant sub-center (a sub-center ArcFace checkpoint) and classes "
                                     "left too small; write the cleaned pack, clean.json and clean_angles.png")
    _model_args(parser)
    parser.add_argument("--pack", required=True, help="the training pack the model was trained on (RecordIO "
                        "pack dir, shards.json or OFRecord part-* dir)")
    parser.add_argument("--output", required=True, help="directory of the cleaned pack (labels renumbered 0..)")
    parser.add_argument("--threshold-deg", type=float, default=clean.DEFAULT_THRESHOLD_DEG,
                        help="drop samples further than this from their class's dominant sub-center [75]")
    parser.add_argument("--min-images", type=int, default=clean.DEFAULT_MIN_IMAGES,
                        help="then drop classes left with fewer images [2]")
    parser.add_argument("--format", choices=CLEAN_FORMATS, default=None,
                        help="output format (default: the source pack's)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(list(argv))
    clean.check_options(args.threshold_deg, args.min_images)
    from megaface.checkpoint import read_meta, resolve_checkpoint
    from megaface.data import build_dataset
    from megaface.eval.embed import embed_images

    output = Path(args.output)
    if output.exists() and not args.force:
        raise FileExistsError(f"--output {output} exists; pass --force to replace it")
    if Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint {args.checkpoint} is a file; `megaface clean` needs the checkpoint "
                         "directory (its FC7 holds the sub-centers): give the output, checkpoints or tag dir")
    tag_dir = resolve_checkpoint(args.checkpoint)
    clean.check_subcenters(int(read_meta(tag_dir).get("subcenters", 1)), tag_dir)
    pack = build_dataset("recordio", args.pack)
    labels = np.asarray(pack.labels(), np.int64)
    state, model, normalize, _, owns_group = _start(args)  # verifies every file of the tag dir, FC7 included
    try:
        images = cast("Sequence[bytes]", _PackImages(pack))  # embed_images needs only len() and [i]
        emb, _ = embed_images(model, images, state, args.batch_size, normalize, flip=False,
                              progress="clean: embed")
        if state.is_main:
            summary = _clean_main(args, tag_dir, pack, labels, emb)
            print(" ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    finally:
        _finish(owns_group)
    return 0


def _clean_main(args: argparse.Namespace, tag_dir: Path, pack: Any, labels: np.ndarray,
                emb: np.ndarray) -> dict[str, Any]:
    """Rank 0: FC7 -> dominant sub-centers -> angles -> the plan -> the pack and its report."""
    from megaface.eval import clean

    weight, k = clean.read_fc7(tag_dir)
    clean.check_subcenters(k, tag_dir)
    cosines = clean.subcenter_cosines(emb, labels, weight, k)
    dominant = clean.dominant_subcenters(cosines, labels, weight.shape[0] // k)
    angles = clean.angles_to_dominant(cosines, labels, dominant)
    plan = clean.plan_clean(angles, labels, len(dominant), args.threshold_deg, args.min_images)
    fmt = args.format or clean.pack_format(pack)
    # The pack and its report files are written into a hidden sibling and renamed into place together: the
    # output appears whole or not at all (a stop between the pack and its report left a pack without one).
    output = Path(args.output)
    staging = make_temp_dir(output)
    try:
        order = clean.write_pack(pack, plan, labels, staging / output.name, fmt)
        report = clean.report(plan, angles, dominant, labels, k, args.threshold_deg, args.min_images,
                              source=str(args.pack), checkpoint=str(tag_dir), output=str(args.output), format=fmt)
        report["noise"] = clean.noise_score(args.pack, plan)  # a synthetic pack's truth, when it has one
        clean.write_outputs(staging / output.name, order, report, angles, args.threshold_deg)
        replace_dir(staging / output.name, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"output": args.output, "format": fmt, "samples": f"{report['samples_in']}->{report['samples_out']}",
            "classes": f"{report['classes_in']}->{report['classes_out']}",
            "dropped_angle": report["samples_dropped"]["angle"],
            "dropped_small_class": report["samples_dropped"]["small_class"]}


# ---- megaface eval-ijb -------------------------------------------------------------------------------

def _load_npy(path: str, what: str, mmap: bool = False) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (write it with `megaface embed`)")
    arr = np.load(path, mmap_mode="r" if mmap else None)
    if arr.ndim != 2:
        raise ValueError(f"{what} {path} has shape {arr.shape}; expected [N, D] features")
    check_finite_rows(arr, f"{what} {path}")
    return arr


def check_finite_rows(features: np.ndarray, where: str, block_rows: int = 65536) -> None:
    """Raise naming the first row holding NaN or inf (scanned in blocks: memory-mapped files stay on disk)."""
    for start in range(0, len(features), block_rows):
        ok = np.isfinite(np.asarray(features[start:start + block_rows])).all(axis=1)
        if not ok.all():
            row = start + int(np.flatnonzero(~ok)[0])
            bad = int((~ok).sum())
            raise ValueError(f"{where}: row {row} holds NaN or infinite values ({bad} such rows in rows "
                             f"{start}..{start + len(ok) - 1}); the model that wrote them diverged or the file "
                             "is damaged: re-embed with a finite checkpoint")


def _ijb_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaface eval-ijb", description="IJB-B/C 1:1 TAR@FAR, from the "
                                     "released loose crops (--checkpoint) or from saved features (--features)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model to embed the aligned crops with (output dir, checkpoints "
                                             "dir, tag dir or backbone file); needs --ijb-dir")
    source.add_argument("--features", help="[N, D] .npy, one row per face-list line")
    parser.add_argument("--ijb-dir", default=None, help="released IJB-B/C folder: loose_crop/ and meta/")
    parser.add_argument("--meta-dir", default=None, help="folder with <target>_face_tid_mid.txt and "
                                                         "<target>_template_pair_label.txt (default: <ijb-dir>/meta)")
    parser.add_argument("--target", default="IJBC", choices=("IJBB", "IJBC"))
    parser.add_argument("--pooling", choices=IJB_POOLINGS, default=None,
                        help="template pooling (default: arcface_torch with --checkpoint, unit with --features)")
    parser.add_argument("--paths", default=None, help="image paths of the feature rows (default: "
                                                      "<features>.paths.txt when present)")
    parser.add_argument("--save-features", default=None, help="with --checkpoint: write the image+flip "
                        "features here (.npy, + .paths.txt) to score again with --features")
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="auto")
    parser.add_argument("--json", default=None)
    parser.add_argument("--roc", default=None, help="draw the ROC (log FAR) into this image (png/pdf/svg)")
    _model_args(parser, checkpoint=False)
    return parser


def main_ijb(argv: Sequence[str]) -> int:
    args = _ijb_parser().parse_args(list(argv))
    if args.meta_dir is None and args.ijb_dir is None:
        raise ValueError("eval-ijb needs the protocol files: pass --ijb-dir (the released folder) or --meta-dir")
    meta_dir = args.meta_dir or str(Path(args.ijb_dir) / "meta")
    if args.checkpoint is not None:
        return _ijb_from_images(args, meta_dir)
    from megaface.eval.ijb import evaluate_ijb

    feats = _load_npy(args.features, "--features")
    paths = Path(args.paths) if args.paths else _sidecar(Path(args.features), ".paths.txt")
    if args.paths and not paths.is_file():
        raise FileNotFoundError(f"--paths {paths} does not exist")
    pooling: IjbPooling = args.pooling or "unit"  # argparse checked the choice
    _report_ijb(evaluate_ijb(feats, meta_dir, args.target, paths, pooling), args)
    return 0


def _ijb_from_images(args: argparse.Namespace, meta_dir: str) -> int:
    """Align the loose crops, embed image + flip on every rank, score on the main rank."""
    from megaface.eval.ijb import evaluate_ijb
    from megaface.eval.ijb_images import embed_ijb, ijb_layout

    if args.ijb_dir is None:
        raise ValueError("--checkpoint embeds the released loose crops: pass --ijb-dir (loose_crop/ and meta/)")
    ijb_layout(args.ijb_dir, args.target)  # checked before the model loads
    save = Path(args.save_features) if args.save_features else None
    for flag, path in (("--save-features", save), ("--json", args.json), ("--roc", args.roc)):
        if path is not None and not Path(path).parent.is_dir():  # found out before the long embedding
            raise FileNotFoundError(f"{flag} {path}: folder {Path(path).parent} does not exist")
    state, model, normalize, _, owns_group = _start(args)
    try:
        feats, scores, names = embed_ijb(model, args.ijb_dir, args.target, state, args.batch_size, normalize,
                                         args.progress)
        if state.is_main:
            if save is not None:
                with atomic_output_files([save, _sidecar(save, ".paths.txt")]) as (npy, txt):
                    save_npy(npy, feats)
                    save_text(txt, "".join(n + "\n" for n in names))
            pooling: IjbPooling = args.pooling or "arcface_torch"
            _report_ijb(evaluate_ijb(feats, meta_dir, args.target, None, pooling, scores), args)
    finally:
        _finish(owns_group)
    return 0


def _report_ijb(result: dict[str, Any], args: argparse.Namespace) -> None:
    from megaface.eval.ijb import format_ijb

    print("\n".join(format_ijb(result)), flush=True)
    _write_json(args.json, {k: v for k, v in result.items() if k not in ("fpr", "tpr")})
    if args.roc:
        from megaface.eval.roc import plot_roc

        plot_roc({result["target"]: (result["fpr"], result["tpr"])}, args.roc, "IJB 1:1 ROC", log_far=True)


# ---- megaface eval-ident -----------------------------------------------------------------------------

def _labels_for(features: str, explicit: str | None, what: str, rows: int) -> np.ndarray:
    path = Path(explicit) if explicit else _sidecar(Path(features), ".labels.npy")
    if not path.is_file():
        raise FileNotFoundError(f"labels for {what} {features}: {path} does not exist; pass --{what}-labels")
    labels = np.load(path)
    if labels.shape != (rows,):
        raise ValueError(f"{path} holds {labels.shape} labels for {rows} {what} rows")
    return labels


def main_ident(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="megaface eval-ident", description="1:N identification (rank-1, CMC)")
    parser.add_argument("--probe", required=True, help="probe features .npy (labels: <probe>.labels.npy)")
    parser.add_argument("--gallery", required=True, help="gallery features .npy (labels: <gallery>.labels.npy)")
    parser.add_argument("--probe-labels", default=None)
    parser.add_argument("--gallery-labels", default=None)
    parser.add_argument("--distractors", nargs="*", default=[], help="distractor features .npy (memory-mapped)")
    parser.add_argument("--max-rank", type=int, default=10)
    parser.add_argument("--block-mb", type=int, default=256, help="size of one probe x candidate score block")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(list(argv))
    from megaface.eval.identification import format_ident, identify

    probe, gallery = _load_npy(args.probe, "--probe"), _load_npy(args.gallery, "--gallery", mmap=True)
    distractors = [_load_npy(d, "--distractors", mmap=True) for d in args.distractors]
    result = identify(probe, _labels_for(args.probe, args.probe_labels, "probe", len(probe)), gallery,
                      _labels_for(args.gallery, args.gallery_labels, "gallery", len(gallery)), distractors,
                      args.max_rank, args.block_mb << 20)
    print("\n".join(format_ident(result)), flush=True)
    _write_json(args.json, {k: v for k, v in result.items() if k != "ranks"})
    return 0


if __name__ == "__main__":
    sys.exit(main_eval(sys.argv[1:]))
