"""`megaface convert` subcommands for InsightFace arcface_torch's own files: its ONNX exports (torch2onnx.py) and
its training checkpoints (train_v2.py's checkpoint_gpu_{rank}.pt). Registered by `megaface.convert.cli`."""

from __future__ import annotations

import argparse
from typing import Any


def _import_onnx(args: argparse.Namespace) -> int:
    from megaface.convert.onnx_import import import_onnx_file

    print(import_onnx_file(args.model, args.output, network=args.network))
    return 0


def _import_ckpt(args: argparse.Namespace) -> int:
    from megaface.convert.arcface_torch_ckpt import import_arcface_torch

    print(import_arcface_torch(args.ckpt_dir, args.output, args.network, args.world_size))
    return 0


def _export_ckpt(args: argparse.Namespace) -> int:
    from megaface.convert.arcface_torch_ckpt import export_arcface_torch

    print(export_arcface_torch(args.checkpoint, args.output, args.world_size))
    return 0


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser("import-arcface-torch", help="arcface_torch checkpoint_gpu_*.pt (train_v2 resume files) -> "
                                                    "megaface checkpoint that --train.resume continues")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="arcface_torch output folder with checkpoint_gpu_<rank>.pt")
    p.add_argument("-o", "--output", required=True, help="megaface checkpoint tag dir, e.g. "
                                                         "OUT/checkpoints/step_00012000")
    p.add_argument("--network", required=True, help="megaface network (arcface_torch r50 = iresnet50, mbf = "
                                                    "mobilefacenet_wide)")
    p.add_argument("--world-size", type=int, default=1, help="ranks of the megaface run (FC7 shards; default 1)")
    p.set_defaults(handler=_import_ckpt)

    p = sub.add_parser("export-arcface-torch", help="megaface checkpoint -> checkpoint_gpu_*.pt + model.pt that "
                                                    "arcface_torch's train_v2 resumes from")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("-o", "--output", required=True, help="arcface_torch output folder to create")
    p.add_argument("--world-size", type=int, required=True, help="GPUs of the arcface_torch run")
    p.set_defaults(handler=_export_ckpt)

    p = sub.add_parser("import-onnx", help="ONNX backbone (arcface_torch torch2onnx.py export) -> megaface backbone")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--network", required=True, help="iresnet18/34/50/100/200 or mobilefacenet[_wide|_large] "
                                                    "(arcface_torch's r50 is iresnet50, its mbf mobilefacenet_wide)")
    p.add_argument("-o", "--output", required=True, help="megaface backbone .pt or .safetensors")
    p.set_defaults(handler=_import_onnx)
