"""`megaface convert`: inspect checkpoints, consolidate ZeRO backbones, merge/reshard FC7, ONNX and
InsightFace interop (arcface_torch state_dicts, MXNet model-zoo files, OneFlow snapshots). Kept light: the subcommand modules are imported only when used.

Library entry points: `megaface.convert.inspect.inspect_checkpoint`, `megaface.convert.consolidate.consolidate`,
`megaface.convert.fc7.merge_checkpoint` / `reshard_checkpoint`, `megaface.convert.onnx_export.export_onnx`,
`megaface.convert.insightface.import_insightface` / `export_insightface`,
`megaface.convert.mxnet.import_mxnet` / `export_mxnet`, `megaface.convert.oneflow.import_oneflow` / `export_oneflow`.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`megaface convert <subcommand> ...`; returns the exit status."""
    from megaface.convert.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
