"""`megaface convert` subcommands for InsightFace arcface_torch's own files: its ONNX exports (torch2onnx.py) and
its training checkpoints (train_v2.py's checkpoint_gpu_{rank}.pt). Registered by `megaface.convert.cli`."""

from __future__ import annotations

import argparse
from typing import Any


def _import_onnx(args: argparse.Namespace) -> int:
    from megaface.convert.onnx_import import import_onnx_file

    print(import_onnx_file(args.model, args.output, network=args.network))
    return 0


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser("import-onnx", help="ONNX backbone (arcface_torch torch2onnx.py export) -> megaface backbone")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--network", required=True, help="iresnet18/34/50/100/200 or mobilefacenet[_wide|_large] "
                                                    "(arcface_torch's r50 is iresnet50, its mbf mobilefacenet_wide)")
    p.add_argument("-o", "--output", required=True, help="megaface backbone .pt or .safetensors")
    p.set_defaults(handler=_import_onnx)
