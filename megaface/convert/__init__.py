"""`megaface convert`: inspect checkpoints, consolidate ZeRO backbones, merge/reshard FC7, ONNX and
InsightFace interop (arcface_torch state_dicts, training checkpoints and ONNX exports, MXNet model-zoo files,
OneFlow snapshots). Kept light: the subcommand modules are imported only when used.

    cli.py                 argument parsing; each handler calls one library function
    inspect.py             `inspect`: what a checkpoint holds (`inspect_checkpoint`)
    consolidate.py         `consolidate`: one fp32 backbone file from any ZeRO stage (`consolidate`)
    fc7.py                 `fc7`: merge the FC7 shards or reshard to another world size
    fc7_import.py          a foreign FC7 classifier (OneFlow / MXNet) written as an FC7 shard set
    onnx_export.py         `onnx`: ONNX export verified with onnxruntime (`export_onnx`)
    insightface.py         arcface_torch state_dicts <-> megaface backbones
    insightface_graph.py   InsightFace's MXNet / OneFlow networks as a graph (layer names and topology)
    insightface_layers.py  parameters of those networks <-> megaface state_dicts
    mxnet.py               MXNet model-zoo files (`-symbol.json` + `.params`) <-> megaface backbones
    mxnet_ops.py           MXNet operator attributes with MXNet's documented defaults (symbol JSON reading)
    mxnet_params.py        MXNet `.params` files in pure numpy
    oneflow.py             OneFlow snapshots <-> megaface backbones
    onnx_import.py         `import-onnx`: arcface_torch torch2onnx graphs -> megaface backbones
    arcface_torch_ckpt.py  `import/export-arcface-torch`: train_v2 resume files <-> megaface checkpoints
    arcface_torch_cli.py   the argument parsing of those three subcommands
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`megaface convert <subcommand> ...`; returns the exit status."""
    from megaface.convert.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
