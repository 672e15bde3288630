"""ONNX export of megaface backbones, verified against PyTorch with onnxruntime.

Graph contract: one input ``input`` float [N, 3, 112, 112] (normalized RGB, as fed to the PyTorch model),
one output ``embedding`` [N, D] (not L2-normalized); N is symbolic ("batch") when ``dynamic_batch``.
Model metadata (``metadata_props``) records producer, network, embedding_size and precision.

Exporters (torch 2.13):
- ``"torchscript"`` (default): torch's TorchScript-tracing exporter (``dynamo=False``). Needs only the
  ``onnx`` package, exports a backbone in seconds; torch marks it deprecated, so its warning is silenced here.
- ``"dynamo"``: the torch.export-based exporter (torch's default since 2.9). Needs the ``onnxscript``
  package and takes 10-50 s per backbone on a CPU; opsets below 18 are produced by down-conversion.
Both give the same numerics for these networks (conv/BN/PReLU/add/flatten/gemm only).

fp16: the model is copied, cast with ``.half()`` and exported, so the graph's input, weights and output are
float16 (what GPU runtimes such as TensorRT or onnxruntime-gpu expect). onnxruntime's CPU provider runs it
too; verify with a tolerance relative to the output scale (``verify_onnx(..., atol=..., rtol=1e-2)``).
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from megaface.fileio import atomic_output_file

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
_EXPORTERS = ("torchscript", "dynamo")


def _dummy_input(model: nn.Module, dtype: torch.dtype, input_size: tuple[int, int, int]) -> torch.Tensor:
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    # Batch 2 rather than 1: torch.export specialises size-1 dimensions, which would pin the batch.
    return torch.rand((2, *input_size), device=device, dtype=dtype) * 2 - 1


def _run_exporter(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                  dynamic_batch: bool, exporter: str) -> None:
    common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter imports it lazily and fails late)
        except ImportError as exc:
            raise ValueError(
                "exporter='dynamo' needs the onnxscript package: pip install onnxscript "
                "(or use exporter='torchscript')"
            ) from exc
        shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=shapes,
                          external_data=False, verbose=False, **common)
        return
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # We choose the tracing exporter on purpose (fast, no onnxscript); its deprecation notice is noise.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=axes,
                          do_constant_folding=True, **common)


def _stamp_metadata(path: Path, model: nn.Module, fp16: bool) -> None:
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {
        "producer": "megaface",
        "network": str(getattr(model, "network_name", type(model).__name__)),
        "embedding_size": str(getattr(model, "embedding_size", "")),
        "precision": "fp16" if fp16 else "fp32",
        "input_layout": "NCHW RGB 112x112, normalized as during training",
    }
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _as_model(model: nn.Module | str | os.PathLike, network: str | None) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if Path(model).suffix == ".onnx":
        raise ValueError(f"got the ONNX file {model} where the model or its checkpoint belongs: "
                         "call verify_onnx(model_or_checkpoint, onnx_path)")
    from megaface.checkpoint import load_backbone

    return load_backbone(model, network=network)[0]


def export_onnx(model: nn.Module | str | os.PathLike, path: str | os.PathLike, opset: int = 17,
                fp16: bool = False, dynamic_batch: bool = True, exporter: str = "torchscript",
                input_size: tuple[int, int, int] = (3, 112, 112), network: str | None = None) -> Path:
    """Export ``model`` (eval mode) to ONNX at ``path`` atomically; returns the final path.

    ``model`` is a backbone module, or a checkpoint/backbone path loaded with
    ``megaface.checkpoint.load_backbone(model, network=network)``.
    The file is written to a temporary name in the same directory, checked with ``onnx.checker`` and then
    renamed, so ``path`` never holds a partial model. The caller's model is left untouched (its training
    mode is restored; fp16 export works on a copy).
    """
    model = _as_model(model, network)
    if exporter not in _EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; choose one of {list(_EXPORTERS)}")
    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"ONNX opset must be an int >= 13 (17 recommended), got {opset!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist; create it first")
    target = copy.deepcopy(model).half() if fp16 else model
    was_training = model.training
    try:
        target.eval()
        with atomic_output_file(path) as tmp, torch.no_grad():
            example = _dummy_input(target, torch.float16 if fp16 else torch.float32, input_size)
            _run_exporter(target, example, tmp, opset, dynamic_batch, exporter)
            _stamp_metadata(tmp, model, fp16)
    finally:
        model.train(was_training)
    return path


def _onnx_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ValueError("verify_onnx needs onnxruntime: pip install onnxruntime") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # deterministic and polite on shared CPUs; verification is small
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(model: nn.Module | str | os.PathLike, path: str | os.PathLike, atol: float = 1e-4,
                rtol: float = 0.0, batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0,
                network: str | None = None) -> float:
    """Run the ONNX file ``path`` with onnxruntime (CPU) and ``model`` in fp32 on the same random inputs.

    ``model`` is a backbone module or a checkpoint/backbone path (as for :func:`export_onnx`).

    Inputs are uniform in [-1, 1] (the range of normalized images), one batch per entry of ``batch_sizes``
    (several sizes exercise the dynamic batch axis). For an fp16 graph the inputs are rounded to fp16 first
    and compared with the fp32 model. Returns the max absolute difference; raises ValueError when any
    element exceeds ``atol + rtol * |torch_output|``.
    """
    model = _as_model(model, network)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist; export it with export_onnx first")
    session = _onnx_session(path)
    feed = session.get_inputs()[0]
    fp16 = "float16" in feed.type
    reference = model if all(p.dtype == torch.float32 for p in model.parameters()) else copy.deepcopy(model).float()
    device = next(reference.parameters()).device
    was_training = reference.training
    generator = torch.Generator().manual_seed(seed)
    # A static-batch graph only accepts its own batch size.
    sizes = (feed.shape[0],) if isinstance(feed.shape[0], int) else batch_sizes
    worst = 0.0
    try:
        reference.eval()
        for batch in sizes:
            x = torch.rand((batch, *feed.shape[1:]), generator=generator) * 2 - 1
            if fp16:
                x = x.half()
            got = torch.from_numpy(session.run(None, {feed.name: x.numpy()})[0]).float()
            with torch.no_grad():
                want = reference(x.float().to(device)).float().cpu()
            if got.shape != want.shape:
                raise ValueError(f"{path}: ONNX output shape {list(got.shape)} != torch {list(want.shape)}; "
                                 "the file was exported from another network or embedding size")
            err = (got - want).abs()
            worst = max(worst, float(err.max()))
            if bool((err > atol + rtol * want.abs()).any()):
                raise ValueError(
                    f"{path}: ONNX output differs from torch by up to {float(err.max()):.3g} at batch {batch} "
                    f"(allowed atol={atol}, rtol={rtol}); was it exported from these weights in eval mode?"
                )
    finally:
        reference.train(was_training)
    return worst
