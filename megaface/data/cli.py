"""``megaface pack``: write RecordIO training packs, .bin verification packs and synthetic data.

  megaface pack rec --images ROOT --output DIR          root/<identity>/*.jpg -> DIR/train.rec/.idx/property
  megaface pack rec --list X.lst [--images ROOT] --output DIR [--workers N] [--shards K] [--resume]
  megaface pack bin --pairs PAIRS --images ROOT --output X.bin
  megaface pack synthetic --output DIR --identities N --images-per-identity K --val-pairs P --seed S
      [--mislabel-share F --low-quality-share Q]   (label noise / degraded faces, val_lq.bin, noise.json)
  megaface pack ofrecord --input PACK_DIR|ROOT|X.bin --output DIR --parts N [--suffix-length 5]

Pairs list (``pack bin``): one pair per line, ``path_a path_b same`` separated by whitespace, ``same`` one of
1/0 (also true/false, same/diff). Paths are relative to ``--images`` (or absolute) and may not contain
whitespace. Blank lines and lines starting with ``#`` are ignored. Image bytes are stored as they are.

Everything is written aside and renamed into place at the end: a failed run leaves no partial output (a `pack
rec` that had completed chunks keeps them in .<output>.partial for --resume).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from megaface.data import synthetic
from megaface.data.bin_pack import save_bin
from megaface.data.decode import CorruptImageError, decode_image
from megaface.data.pack_rec import DEFAULT_CHUNK

REC_HELP = """Pack an image folder root/<identity>/*.jpg or an MXNet im2rec .lst into an InsightFace pack.

Worker processes read, decode (verify) and, with --quality, re-encode the images; the parent writes them in
list order, so the bytes are the same for any --workers. An interrupted run (killed, out of disk) leaves
.<output>.partial next to the output: rerun the same command with --resume to continue from its last complete
chunk, with the same result as an uninterrupted run; --force starts over. --shards K writes K packs of whole
classes (shard-00000/, ...) and shards.json, which data.path and `megaface embed --pack` read as one dataset.
A .lst is sorted by label (stable) to group the classes; its labels must be 0..C-1.
"""

_TRUE, _FALSE = {"1", "true", "same", "yes"}, {"0", "false", "diff", "different", "no"}


def pack_rec(args: argparse.Namespace) -> dict:
    """`megaface pack rec`: a folder or an im2rec .lst -> pack (megaface.data.pack_rec)."""
    from megaface.data import image_list
    from megaface.data.pack_rec import PackOptions, pack_images

    if args.list is None and args.images is None:
        raise ValueError("pack rec needs --images ROOT (root/<identity>/*.jpg) or --list FILE.lst (im2rec list)")
    images = image_list.from_lst(args.list, args.images) if args.list else image_list.from_folder(args.images)
    options = PackOptions(verify=not args.no_verify, quality=args.quality, shards=args.shards)
    return pack_images(images, args.output, options, workers=args.workers, resume=args.resume,
                       overwrite=args.force, chunk_size=args.chunk_size)


def read_pairs(path: str | Path, root: str | Path) -> tuple[list[Path], list[bool]]:
    """Parse a pairs list -> (2P image paths in pair order, issame [P])."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"pairs list not found: {path}")
    files, issame = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3 or fields[2].lower() not in _TRUE | _FALSE:
            raise ValueError(f"{path}:{n}: expected 'path_a path_b 1|0', got {line.strip()!r}")
        for name in fields[:2]:
            p = Path(name) if Path(name).is_absolute() else root / name
            if not p.is_file():
                raise FileNotFoundError(f"{path}:{n}: image {p} not found (paths are relative to {root})")
            files.append(p)
        issame.append(fields[2].lower() in _TRUE)
    if not issame:
        raise ValueError(f"{path}: no pairs found; expected lines 'path_a path_b 1|0'")
    return files, issame


def pack_pairs(pairs: str | Path, images: str | Path, output: str | Path, verify: bool = True) -> dict:
    files, issame = read_pairs(pairs, images)
    blobs = []
    for f in files:
        data = f.read_bytes()
        if verify:
            try:
                decode_image(data)
            except CorruptImageError as err:
                raise CorruptImageError(f"{f}: {err}; remove the pair or replace the file") from None
        blobs.append(data)
    save_bin(output, blobs, issame)
    return {"pairs": len(issame), "same": sum(issame), "output": str(output)}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megaface pack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="kind", required=True)
    rec = sub.add_parser("rec", help="image folder root/<identity>/*.jpg or im2rec .lst -> train.rec/.idx/property",
                         description=REC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    rec.add_argument("--images", help="root/<identity>/*.jpg (identities = sorted folder names); with --list, "
                     "the root the list's paths are relative to (default: the list's folder)")
    rec.add_argument("--list", help="MXNet im2rec .lst: index<TAB>label<TAB>path per line")
    rec.add_argument("--output", required=True, help="directory for train.rec, train.idx, property")
    rec.add_argument("--workers", type=int, default=None,
                     help="worker processes that read, verify and encode (default: the cores this process may use)")
    rec.add_argument("--shards", type=int, default=1,
                     help="K > 1: K packs of whole classes and a shards.json that data.path can name")
    rec.add_argument("--resume", action="store_true",
                     help="continue an interrupted pack of this output from its last complete chunk")
    rec.add_argument("--quality", type=int, default=None,
                     help="re-encode every image as JPEG at this quality (default: store the files as they are)")
    rec.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                     help="images per work unit and per resume point (does not change the output)")
    b = sub.add_parser("bin", help="pairs list -> .bin verification pack",
                       description="Pairs list: one pair per line, 'path_a path_b 1|0' (1 = same identity; "
                       "true/false and same/diff also accepted), whitespace separated, paths relative to "
                       "--images or absolute, no spaces inside paths; '#' comments and blank lines ignored.")
    b.add_argument("--pairs", required=True, help="text file, one 'path_a path_b 1|0' per line")
    b.add_argument("--images", required=True, help="root the pair paths are relative to")
    b.add_argument("--output", required=True, help="the .bin to write (pickle of (bins, issame_list))")
    syn = sub.add_parser("synthetic", help="synthetic identities -> pack + held-out val.bin")
    syn.add_argument("--output", required=True)
    syn.add_argument("--identities", type=int, default=synthetic.DEFAULT_IDENTITIES)
    syn.add_argument("--images-per-identity", type=int, default=synthetic.DEFAULT_IMAGES_PER_IDENTITY)
    syn.add_argument("--val-pairs", type=int, default=synthetic.DEFAULT_VAL_PAIRS)
    syn.add_argument("--seed", type=int, default=synthetic.DEFAULT_SEED)
    syn.add_argument("--mislabel-share", type=float, default=0.0,
                     help="share of training images written with a wrong identity (label noise); 0 = none")
    syn.add_argument("--low-quality-share", type=float, default=0.0,
                     help="share of training images degraded (low resolution, blur, occlusion); > 0 also "
                     "writes val_lq.bin, the verification pairs degraded; 0 = none")
    ofr = sub.add_parser("ofrecord", help="RecordIO pack, image folder or .bin -> OFRecord part files",
                         description="A RecordIO pack directory or an image folder gives training parts "
                         "(encoded + label); a .bin gives verification parts (encoded + issame).")
    ofr.add_argument("--input", required=True, help="RecordIO pack dir (train.rec), image folder or .bin")
    ofr.add_argument("--output", required=True, help="directory for part-00000, part-00001, ...")
    ofr.add_argument("--parts", type=int, default=1, help="number of part files (records split in order)")
    ofr.add_argument("--suffix-length", type=int, default=5,
                     help="zero-pad part numbers to this many digits (the seed's 5; 1 = part-0, part-1, ...)")
    sub.add_parser("preview", help="a PNG grid of training samples after flip and data.augment (see --help)",
                   add_help=False)  # served by megaface.train.preview (it reads the experiment config)
    for p in (rec, b, syn, ofr):
        p.add_argument("--force", action="store_true", help="replace an existing output")
    for p in (rec, b):
        p.add_argument("--no-verify", action="store_true", help="do not decode every image before packing")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    if args.kind == "preview":
        raise ValueError("run the preview as `megaface pack preview ...` (it reads the experiment config)")
    if args.kind == "rec":
        summary = pack_rec(args)
    elif args.kind == "bin":
        if Path(args.output).exists() and not args.force:
            raise FileExistsError(f"output {args.output} exists; pass --force to replace it")
        summary = pack_pairs(args.pairs, args.images, args.output, verify=not args.no_verify)
    elif args.kind == "ofrecord":
        from megaface.data.ofrecord_pack import pack_ofrecord

        summary = pack_ofrecord(args.input, args.output, args.parts, args.suffix_length, overwrite=args.force,
                                progress="auto")
    else:
        from megaface.data.synthetic import write_synthetic
        from megaface.data.synthetic_noise import SyntheticNoise

        noise = SyntheticNoise(args.mislabel_share, args.low_quality_share)
        out, bin_path = write_synthetic(args.output, args.identities, args.images_per_identity,
                                        args.val_pairs, args.seed, overwrite=args.force, noise=noise)
        summary = {"output": str(out), "val_bin": str(bin_path), "identities": args.identities,
                   "images": args.identities * args.images_per_identity, "val_pairs": args.val_pairs}
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
