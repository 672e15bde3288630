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

Tolerance: an element passes when ``|onnx - torch| <= atol + rtol * max|torch row|``, i.e. relative to the
scale of that sample's embedding (un-normalized embeddings of a trained iresnet reach ~1e4, where an absolute
1e-4 would reject a correct export; near-zero elements are judged against the row's scale, not their own).
``export_onnx(..., verify=True)`` runs the check on the temporary file, so a failed check leaves no ``.onnx``.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

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
    common: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter imports it lazily and fails late)
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError("--exporter dynamo needs onnxscript, or use --exporter torchscript",
                                      name="onnxscript") from exc
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
                input_size: tuple[int, int, int] = (3, 112, 112), network: str | None = None,
                verify: bool = False, atol: float | None = None, rtol: float | None = None) -> Path:
    """Export ``model`` (eval mode) to ONNX at ``path`` atomically; returns the final path.

    ``model`` is a backbone module, or a checkpoint/backbone path loaded with
    ``megaface.checkpoint.load_backbone(model, network=network)``.
    The file is written to a temporary name in the same directory, checked with ``onnx.checker`` and then
    renamed, so ``path`` never holds a partial model. With ``verify`` the temporary is also compared with
    torch by :func:`verify_onnx` (tolerances default to :func:`default_tolerance`) before the rename: a failed
    check raises ValueError and leaves ``path`` as it was. The caller's model is left untouched (its training
    mode is restored; fp16 export works on a copy).
    """
    # optional packages, imported before the work: torch's exporter reports a missing onnx late, in its own
    # words; megaface.cli names the extra that installs them
    import onnx  # noqa: F401
    if verify:
        import onnxruntime  # noqa: F401
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
            if verify:
                default_atol, default_rtol = default_tolerance(fp16)
                verify_onnx(model, tmp, atol=default_atol if atol is None else atol,
                            rtol=default_rtol if rtol is None else rtol, name=path)
    finally:
        model.train(was_training)
    return path


def default_tolerance(fp16: bool) -> tuple[float, float]:
    """(atol, rtol) for verify_onnx: fp16 graphs round inputs and weights, fp32 only reorders sums."""
    return (1e-2, 1e-2) if fp16 else (1e-4, 1e-4)


def _onnx_session(path: Path):
    import onnxruntime as ort  # an optional package: megaface.cli names the extra that installs it
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # deterministic and polite on shared CPUs; verification is small
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(model: nn.Module | str | os.PathLike, path: str | os.PathLike, atol: float = 1e-4,
                rtol: float = 1e-4, batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0,
                network: str | None = None, name: str | os.PathLike | None = None) -> float:
    """Run the ONNX file ``path`` with onnxruntime (CPU) and ``model`` in fp32 on the same random inputs.

    ``model`` is a backbone module or a checkpoint/backbone path (as for :func:`export_onnx`).

    Inputs are uniform in [-1, 1] (the range of normalized images), one batch per entry of ``batch_sizes``
    (several sizes exercise the dynamic batch axis). For an fp16 graph the inputs are rounded to fp16 first
    and compared with the fp32 model. Returns the max absolute difference; raises ValueError when any
    element exceeds ``atol + rtol * max|torch_output row|``. ``name``: the path to show in errors (the
    final name when ``path`` is a temporary).
    """
    model = _as_model(model, network)
    path = Path(path)
    shown = Path(name) if name is not None else path
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
                raise ValueError(f"{shown}: ONNX output shape {list(got.shape)} != torch {list(want.shape)}; "
                                 "the file was exported from another network or embedding size")
            err = (got - want).abs()
            worst = max(worst, float(err.max()))
            scale = want.abs().amax(dim=1, keepdim=True)
            if bool((err > atol + rtol * scale).any()):
                raise ValueError(
                    f"{shown}: ONNX output differs from torch by up to {float(err.max()):.3g} at batch {batch} "
                    f"(output scale {float(scale.max()):.3g}; allowed atol={atol} + rtol={rtol} x scale); was it "
                    "exported from these weights in eval mode?"
                )
    finally:
        reference.train(was_training)
    return worst
