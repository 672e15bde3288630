"""Argument parsing for `megaface convert <subcommand>`; each handler calls one library function.

User errors (ValueError, FileNotFoundError, FileExistsError) print one line naming the problem and return
exit status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable


def _inspect(args: argparse.Namespace) -> int:
    from megaface.convert.inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, verify=args.verify)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report))
    return 1 if report["problems"] else 0  # scripts can tell a damaged checkpoint from the exit status


def _consolidate(args: argparse.Namespace) -> int:
    from megaface.checkpoint.layout import sidecar_path
    from megaface.convert.consolidate import consolidate

    out = consolidate(args.checkpoint, args.output, network=args.network, verify=args.verify)
    print(f"wrote fp32 backbone {out} (+ {sidecar_path(out)})")
    return 0


def _fc7(args: argparse.Namespace) -> int:
    from megaface.checkpoint.integrity import open_checkpoint
    from megaface.convert.fc7 import merge_checkpoint, reshard_checkpoint

    tag_dir = open_checkpoint(args.checkpoint, verify=args.verify)
    if args.merge:
        if args.output is None:
            raise ValueError("fc7 --merge needs -o FILE.pt for the merged classifier")
        print(f"wrote merged FC7 {merge_checkpoint(tag_dir, args.output)}")
        return 0
    if args.reshard < 1:
        raise ValueError(f"--reshard {args.reshard}: the world size must be >= 1")
    # default: beside the run's checkpoints/ (inside it, the trainer's pruning and 'latest' fallback would
    # treat the copy as one of its own saves)
    tag_dir = Path(tag_dir)
    output = args.output or str(tag_dir.parent.with_name(f"{tag_dir.parent.name}_fc7w{args.reshard}") / tag_dir.name)
    out = reshard_checkpoint(tag_dir, args.reshard, output)
    print(f"wrote checkpoint {out} with FC7 resharded for {args.reshard} ranks")
    return 0


def _onnx(args: argparse.Namespace) -> int:
    from megaface.checkpoint import load_backbone
    from megaface.convert.onnx_export import default_tolerance, export_onnx

    if args.opset < 17:
        raise ValueError(f"--opset {args.opset}: megaface exports opset 17 or newer")
    model, _ = load_backbone(args.checkpoint, network=args.network, verify=args.verify)  # once for export+check
    # checked with onnxruntime before the rename: a failed check leaves no .onnx behind
    out = export_onnx(model, args.output, opset=args.opset, fp16=args.fp16, exporter=args.exporter,
                      verify=args.verify)
    print(f"wrote {out} (opset {args.opset}, {'fp16' if args.fp16 else 'fp32'}, dynamic batch)")
    if args.verify:
        atol, rtol = default_tolerance(args.fp16)
        print(f"onnxruntime matches torch (atol {atol:g}, rtol {rtol:g} of each embedding's scale)")
    return 0


def _import_insightface(args: argparse.Namespace) -> int:
    from megaface.convert.insightface import import_insightface_file

    print(import_insightface_file(args.model, args.output, network=args.network,
                                  embedding_size=args.embedding_size))
    return 0


def _export_insightface(args: argparse.Namespace) -> int:
    from megaface.convert.insightface import export_insightface_file

    print(export_insightface_file(args.checkpoint, args.output, network=args.network, verify=args.verify))
    return 0


def _import_foreign(args: argparse.Namespace) -> int:
    if args.command == "import-oneflow":
        from megaface.convert.oneflow import import_oneflow

        print(import_oneflow(args.source, args.output, args.network, args.fc7_output, args.num_classes))
    else:
        from megaface.convert.mxnet import import_mxnet

        print(import_mxnet(args.source, args.output, args.network, args.epoch, args.fc7_output, args.num_classes))
    return 0


def _export_foreign(args: argparse.Namespace) -> int:
    if args.command == "export-oneflow":
        from megaface.convert.oneflow import export_oneflow

        print(export_oneflow(args.checkpoint, args.output, network=args.network, verify=args.verify))
    else:
        from megaface.convert.mxnet import export_mxnet

        print(export_mxnet(args.checkpoint, args.output, network=args.network, epoch=args.epoch,
                           verify=args.verify))
    return 0


def _add_foreign(sub: Any) -> None:
    """import/export-oneflow and import/export-mxnet (InsightFace's OneFlow snapshots and MXNet model zoo)."""
    for fmt, source, what in (("oneflow", "SNAPSHOT_DIR", "OneFlow snapshot directory"),
                              ("mxnet", "PREFIX", "MXNet PREFIX of PREFIX-symbol.json + PREFIX-EPOCH.params")):
        p = sub.add_parser(f"import-{fmt}", help=f"InsightFace {what} -> megaface backbone")
        p.add_argument("source", metavar=source, help=what)
        p.add_argument("--network", required=True, help="mobilefacenet (y1) or iresnet18/34/50/100/200")
        p.add_argument("-o", "--output", required=True, help="megaface backbone .pt or .safetensors")
        if fmt == "mxnet":
            p.add_argument("--epoch", type=int, default=0, help="checkpoint epoch (PREFIX-%%04d.params; default 0)")
        p.add_argument("--fc7-output", help="where an fc7 weight goes (default: OUTPUT stem + '_fc7/')")
        p.add_argument("--num-classes", type=int, help="keep the first N FC7 rows (drops class padding)")
        p.set_defaults(handler=_import_foreign)

        p = sub.add_parser(f"export-{fmt}", help=f"megaface backbone -> InsightFace {fmt} files")
        p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint or a backbone file")
        p.add_argument("-o", "--output", required=True,
                       help="snapshot directory" if fmt == "oneflow" else "MXNet PREFIX (writes PREFIX-symbol.json, "
                                                                          "PREFIX-EPOCH.params)")
        p.add_argument("--network", help="network name when the source has no meta")
        if fmt == "mxnet":
            p.add_argument("--epoch", type=int, default=0, help="epoch number in the params file name (default 0)")
        _no_verify(p)
        p.set_defaults(handler=_export_foreign)


def _no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="use the checkpoint without checking its sha256 digests (a warning says so)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megaface convert", description=(
        "Inspect and convert megaface checkpoints. CKPT is an output dir, its checkpoints/ dir or one "
        "step_NNNNNNNN tag dir (the newest complete one is used for the first two)."))
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("inspect", help="iteration, network, FC7 shards, ZeRO stage, precision, config")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--verify", action="store_true",
                   help="also load every tensor and check it is finite (file digests are always checked)")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser("consolidate", help="plain fp32 backbone (.pt/.safetensors) from any ZeRO stage")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("-o", "--output", required=True, help="backbone.pt or backbone.safetensors")
    p.add_argument("--network", help="network name when meta.json has none (must agree when it has one)")
    _no_verify(p)
    p.set_defaults(handler=_consolidate)

    p = sub.add_parser("fc7", help="merge the FC7 shards into one matrix, or reshard for another world size")
    p.add_argument("checkpoint", metavar="CKPT")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="write the full [num_classes, D] weight + momentum")
    mode.add_argument("--reshard", type=int, metavar="W", help="write a copy of the checkpoint with W shards")
    p.add_argument("-o", "--output", help="--merge: output file; --reshard: output tag dir (default: "
                                          "OUTPUT/checkpoints_fc7w<W>/<tag>)")
    _no_verify(p)
    p.set_defaults(handler=_fc7)

    p = sub.add_parser("onnx", help="ONNX export (dynamic batch), verified with onnxruntime")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint or a backbone file (.pt/.safetensors)")
    p.add_argument("-o", "--output", required=True, help="model.onnx")
    p.add_argument("--network", help="network name when the source has no meta")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    p.add_argument("--fp16", action="store_true", help="export fp16 weights and activations")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch ONNX exporter (dynamo needs onnxscript; default torchscript)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip both checks: the checkpoint's sha256 digests (a warning says so) and the onnxruntime "
                        "comparison with torch (random inputs, batch 1 and 3)")
    p.set_defaults(handler=_onnx)

    p = sub.add_parser("import-insightface", help="arcface_torch iresnet/mbf/vit state_dict -> megaface backbone")
    p.add_argument("model", help="arcface_torch backbone .pt/.pth (a state_dict)")
    p.add_argument("-o", "--output", required=True, help="megaface backbone .pt or .safetensors")
    p.add_argument("--network", help="megaface network name (default: detected from keys and shapes)")
    p.add_argument("--embedding-size", type=int, help="expected embedding width (checked against the file)")
    p.set_defaults(handler=_import_insightface)

    p = sub.add_parser("export-insightface", help="megaface backbone -> arcface_torch state_dict")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint or a backbone file")
    p.add_argument("-o", "--output", required=True, help="arcface_torch backbone .pt")
    p.add_argument("--network", help="network name when the source has no meta")
    _no_verify(p)
    p.set_defaults(handler=_export_insightface)
    _add_foreign(sub)
    from megaface.convert.arcface_torch_cli import add_subcommands as add_arcface_torch

    add_arcface_torch(sub)  # import-onnx, import-arcface-torch, export-arcface-torch
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)  # errors go up to megaface.cli, which prints one line and picks the exit status
