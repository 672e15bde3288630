"""One-accelerator readiness check; prints one JSON summary line (see benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py            # one GPU: 1-rank NCCL group, full sizes (< 8 min on an H100/H200)
    python benchmarks/gpu_check.py --dry-run  # CPU: 1-rank gloo group, tiny sizes, bf16 (tests the plumbing)

(a) train: iresnet100 and mobilefacenet, zero1_bf16 and zero1_fp16, ~100 steps on a fixed pool of synthetic
    batches (memorisation, so the loss must fall): every loss finite, mean of the last 10 < mean of the first 10
    (dry run: 30 steps, windows of 7).
(b) overflow: zero1_fp16 MobileFaceNet; the loss of two consecutive steps is multiplied by inf (two: the
    shipped JSONs use hysteresis 2, so the first overflow only spends the hysteresis). Each injected step must
    leave the backbone AND the FC7 shard unchanged and count as skipped, the loss scale must drop, and the
    following steps must train again. On CPU DeepSpeed refuses fp16: the dry run checks instead (bf16) that
    the injected non-finite loss is caught by read_losses at the injected iteration.
(c) speed: iresnet100 bf16 at 128 per GPU, samples/s and MFU = 3 x 2 x 12.1e9 x samples/s / PEAK_BF16_FLOPS
    (default 989e12, H100/H200 dense bf16); the head alone (PartialFC + ShardSGD fed bf16 embeddings, as a
    bf16 engine hands them over; the head computes in its own dtype policy) at 1M and 10M classes.
(d) input: whole bf16 train steps fed by a TrainLoader over a synthetic RecordIO pack, the old input path
    (float32 normalised on the host, unpinned copy in the step) against the new one (uint8, pinned, copied one
    batch ahead on a side stream, normalised on the device), alternated twice in one run: samples/s of each
    and the bytes per image that cross to the device.
(e) syncs: host syncs per bf16 Partial FC step under torch.cuda.set_sync_debug_mode("warn"), by call site
    (megaface's own must be at most the two that megaface.train.step documents: the softmax's nonzero and
    Partial FC's unique, both in megaface/head); CUDA only, the dry run says so and passes.
(f) compile: the same steps eager and with model.compile=true (torch.compile inside the DeepSpeed engine):
    the first loss (same weights, same batch) within 1% (bf16), every loss finite, the time of the first
    steps (compilation) and samples/s after. Not in the dry run's default list: inductor's CPU build of even
    the tiny network takes minutes (`--dry-run --only compile` runs it).
(g) decode: data.decode=gpu, nvJPEG (torchvision) against libjpeg-turbo on the new input path: mean and max
    pixel difference on one batch, samples/s of each, bytes per image to the device (pixels vs JPEG). Needs
    torchvision built for the installed torch on the GPU machine (the check reports its absence as a failure);
    the dry run puts megaface's host decoder in nvJPEG's place (the plumbing; pixels must then be equal).
The device and backend come from megaface's distributed state (cuda + nccl when a GPU is visible).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ROOT, _batches, build_parts_for  # noqa: E402 - benchmarks/ is not a package

DOCUMENTED_SYNCS = 2
"""Host syncs per step that megaface.train.step documents for a Partial FC step without inter-class filtering:
the softmax's nonzero of this rank's targets and Partial FC's unique of the positive classes."""

IRESNET100_MACS = 12.1e9  # multiply-adds of one 112x112 forward


def _sizes(dry: bool) -> dict[str, Any]:
    if dry:
        return {"nets": ["mobilefacenet_tiny"], "train_steps": 30, "batch": 8, "classes": 64, "speed_net":
                "mobilefacenet_tiny", "speed_batch": 4, "speed_steps": 2, "head_classes": [1000, 10_000],
                "precisions": ["bf16"], "input_net": "mobilefacenet_tiny", "input_batch": 8, "input_steps": 3,
                "input_identities": 16, "input_workers": 1, "compile_net": "mobilefacenet_tiny",
                "compile_batch": 4, "compile_steps": 2}
    return {"nets": ["iresnet100", "mobilefacenet"], "train_steps": 100, "batch": 64, "classes": 1000,
            "speed_net": "iresnet100", "speed_batch": 128, "speed_steps": 20,
            "head_classes": [1_000_000, 10_000_000], "precisions": ["bf16", "fp16"],
            "input_net": "mobilefacenet", "input_batch": 256, "input_steps": 30, "input_identities": 2000,
            "input_workers": 8, "compile_net": "iresnet50", "compile_batch": 128, "compile_steps": 20}


def _sync(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None and hasattr(module, "synchronize"):
        module.synchronize()


def _pool(state: Any, batch: int, classes: int, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few fixed batches, already on the device: the timed steps copy nothing from the host."""
    gen = torch.Generator().manual_seed(1234 + state.rank)
    return [(torch.randn(batch, 3, 112, 112, generator=gen).to(state.device),
             torch.randint(0, classes, (batch,), generator=gen).to(state.device)) for _ in range(count)]


def _parts(state: Any, net: str, precision: str, batch: int, classes: int, overrides: list[str] = ()) -> Any:
    path = ROOT / "ds_configs" / f"zero1_{precision}.json"
    return build_parts_for(state, net, path, list(overrides), batch, classes, 1.0, None)


def _train(state: Any, net: str, precision: str, size: dict[str, Any]) -> tuple[Any, list[torch.Tensor]]:
    from megaface.train.step import train_step

    parts = _parts(state, net, precision, size["batch"], size["classes"])
    pool = _pool(state, size["batch"], size["classes"])
    losses = []
    for step in range(size["train_steps"]):
        images, labels = pool[step % len(pool)]
        losses.append(train_step(parts, images, labels))
    return parts, losses


def check_train(state: Any, size: dict[str, Any]) -> list[dict[str, Any]]:
    from megaface.train.step import read_losses

    out = []
    for net in size["nets"]:
        for precision in size["precisions"]:
            started = time.perf_counter()
            parts, pending = _train(state, net, precision, size)
            values = read_losses(pending, parts, 0)  # fp16: no raise (skipped steps); checked below
            k = max(1, min(10, len(values) // 4))  # 10 of 100 steps; 7 of the dry run's 30
            first, last = sum(values[:k]) / k, sum(values[-k:]) / k
            finite = all(math.isfinite(v) for v in values)
            out.append({"network": net, "ds_config": f"zero1_{precision}.json", "steps": len(values),
                        "window": k,
                        "loss_first": round(first, 4), "loss_last": round(last, 4), "finite": finite,
                        "falls": last < first, "skipped": int(parts.engine.skipped_steps),
                        "seconds": round(time.perf_counter() - started, 1), "ok": finite and last < first})
            del parts
    return out


def _snapshot(parts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    first = next(parts.backbone.parameters())
    return first.detach().float().clone(), parts.head.weight.detach().float().clone()


def check_overflow(state: Any, size: dict[str, Any], dry: bool) -> dict[str, Any]:
    from megaface.train.step import NonFiniteLoss, loss_scale, read_losses, train_step

    precision = "bf16" if dry else "fp16"
    parts = _parts(state, size["nets"][-1], precision, size["batch"], size["classes"])
    pool = _pool(state, size["batch"], size["classes"])
    head, inject = parts.head, {"on": False}

    def injecting(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = head(embeddings, labels)
        return loss * float("inf") if inject["on"] else loss  # an overflow, on purpose

    parts.head = injecting
    pending = [train_step(parts, *pool[i % 4]) for i in range(5)]
    if dry:
        inject["on"] = True
        pending.append(train_step(parts, *pool[1]))
        try:
            read_losses(pending, parts, 0)
            caught = None
        except NonFiniteLoss as err:
            caught = err.iteration
        return {"precision": precision, "fp16": "skipped: DeepSpeed refuses fp16 on CPU",
                "nonfinite_caught_at": caught, "ok": caught == 5}
    read_losses(pending, parts, 0)
    scale_before, skipped_before = loss_scale(parts.engine), int(parts.engine.skipped_steps)
    unchanged = []
    for step in range(2):
        backbone, fc7 = _snapshot(parts)
        inject["on"] = True
        train_step(parts, *pool[step])
        inject["on"] = False
        after = _snapshot(parts)
        unchanged.append(bool(torch.equal(backbone, after[0]) and torch.equal(fc7, after[1])))
    scale_after, skipped_after = loss_scale(parts.engine), int(parts.engine.skipped_steps)
    backbone, fc7 = _snapshot(parts)
    later = read_losses([train_step(parts, *pool[i % 4]) for i in range(5)], parts, 7)
    after = _snapshot(parts)
    trains_again = not torch.equal(backbone, after[0]) and not torch.equal(fc7, after[1])
    ok = (all(unchanged) and skipped_after == skipped_before + 2 and scale_after < scale_before
          and trains_again and all(math.isfinite(v) for v in later))
    return {"precision": precision, "injected_steps_left_weights_unchanged": unchanged,
            "skipped_before": skipped_before, "skipped_after": skipped_after, "loss_scale_before": scale_before,
            "loss_scale_after": scale_after, "trains_again": trains_again, "ok": ok}


def check_speed(state: Any, size: dict[str, Any]) -> dict[str, Any]:
    from megaface.train.step import read_losses, train_step

    batch, steps = size["speed_batch"], size["speed_steps"]
    parts = _parts(state, size["speed_net"], "bf16", batch, 100_000 if batch > 8 else 1000)
    pool = _pool(state, batch, 1000)
    read_losses([train_step(parts, *pool[i % 4]) for i in range(3)], parts, 0)  # warm-up, then wait for it
    started = time.perf_counter()
    pending = [train_step(parts, *pool[i % 4]) for i in range(steps)]
    read_losses(pending, parts, 3)  # the one host read: waits for the device
    seconds = time.perf_counter() - started
    sps = batch * state.world_size * steps / seconds
    peak = float(os.environ.get("PEAK_BF16_FLOPS", "989e12"))
    del parts
    backbone = {"network": size["speed_net"], "batch_per_rank": batch, "samples_per_s": round(sps, 1),
                "mfu": round(3 * 2 * IRESNET100_MACS * sps / peak, 4), "peak_flops": peak}
    return {"backbone": backbone, "head": [_head_speed(state, c) for c in size["head_classes"]]}


def _head_speed(state: Any, classes: int, batch: int = 128, steps: int = 10) -> dict[str, Any]:
    from megaface.head import PartialFC, ShardSGD

    rate = float(os.environ.get("HEAD_SAMPLE_RATE", "0.1"))
    device = state.device
    head = PartialFC(512, classes, sample_rate=rate, group=state.group).to(device)
    opt = ShardSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    emb = torch.randn(batch, 512, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device)
    for step in range(3 + steps):
        if step == 3:
            _sync(device)
            started = time.perf_counter()
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None
    finite = math.isfinite(float(loss.detach()))  # host read: waits for the device
    seconds = (time.perf_counter() - started) / steps
    return {"classes": classes, "sample_rate": rate, "batch": batch, "ms_per_step": round(1000 * seconds, 2),
            "samples_per_s": round(batch / seconds, 1), "finite": finite}


def check_input(state: Any, size: dict[str, Any]) -> dict[str, Any]:
    from megaface.data import TrainLoader

    cuda = state.device.type == "cuda"

    def loader(path: str, dataset: Any) -> Any:
        new = path == "new"
        return TrainLoader(dataset, size["input_batch"], state.rank, state.world_size, workers=size["input_workers"],
                           on_device=new, device=state.device if new else None, pin_memory=new and cuda)

    rates = _input_rates(state, size, ("old", "new"), loader)
    best = {path: max(values) for path, values in rates.items()}
    pixels = 3 * 112 * 112
    return {"network": size["input_net"], "batch_per_rank": size["input_batch"], "steps": size["input_steps"],
            "workers": size["input_workers"],
            "samples_per_s": {path: [round(v, 1) for v in values] for path, values in rates.items()},
            "new_over_old": round(best["new"] / best["old"], 3),
            "bytes_per_image_to_device": {"old": 4 * pixels, "new": pixels}, "ok": all(best.values())}


def _input_rates(state: Any, size: dict[str, Any], paths: tuple[str, ...], make: Callable[[str, Any], Any],
                 extra: Callable[[Any], None] | None = None) -> dict[str, list[float]]:
    """samples/s of bf16 train steps fed by `make(path, dataset)` for each path, alternated twice over one
    synthetic RecordIO pack (a change of clock or load hits every path alike); `extra(dataset)` runs first."""
    from megaface.data import build_dataset
    from megaface.data.synthetic import ensure_synthetic
    from megaface.train.step import read_losses, train_step

    batch, steps, identities = size["input_batch"], size["input_steps"], size["input_identities"]
    root = Path(tempfile.mkdtemp(prefix="megaface_gpu_check_"))
    try:
        pack, _ = ensure_synthetic(root, identities, 4, 0)
        dataset = build_dataset("recordio", str(pack))
        if extra is not None:
            extra(dataset)
        parts = _parts(state, size["input_net"], "bf16", batch, identities)
        rates: dict[str, list[float]] = {path: [] for path in paths}
        for _ in range(2):
            for path in paths:
                loader = make(path, dataset)
                batches = _batches(loader, 1)  # across epochs: a timed run may outlast the pack
                read_losses([train_step(parts, *next(batches)) for _ in range(3)], parts, 0)  # warm-up, wait
                started = time.perf_counter()
                read_losses([train_step(parts, *next(batches)) for _ in range(steps)], parts, 3)
                rates[path].append(batch * state.world_size * steps / (time.perf_counter() - started))
                loader.close()
        del parts
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rates


def check_decode(state: Any, size: dict[str, Any]) -> dict[str, Any]:
    """(g) data.decode=gpu: nvJPEG's pixels against libjpeg-turbo's on the same batch, and train steps fed by
    each decoder (both on the new input path), alternated twice: samples/s and bytes per image to the device.
    The dry run has no nvJPEG: megaface's host decoder stands in (the plumbing, and pixels equal)."""
    from megaface.data import TrainLoader
    from megaface.data.device_decode import host_decoder, nvjpeg_decoder

    cuda = state.device.type == "cuda"
    decoder = nvjpeg_decoder(state.device) if cuda else host_decoder
    pixels: dict[str, Any] = {}

    def loader(path: str, dataset: Any) -> Any:
        return TrainLoader(dataset, size["input_batch"], state.rank, state.world_size, workers=size["input_workers"],
                           on_device=True, device=state.device, pin_memory=cuda, decode=path,
                           device_decoder=decoder if path == "gpu" else None)

    def compare(dataset: Any) -> None:
        batches = []
        for path in ("cpu", "gpu"):
            source = loader(path, dataset)
            batches.append(next(iter(source))[0])
            source.close()
        a, b = batches
        diff = (a.images.to(torch.int16) - b.images.to(torch.int16)).abs()
        jpeg = sum(len(dataset[i][1]) for i in range(min(len(dataset), 512))) / min(len(dataset), 512)
        pixels.update(mean_abs_diff=round(float(diff.float().mean()), 4), max_abs_diff=int(diff.max()),
                      jpeg_bytes_per_image=round(jpeg))

    rates = _input_rates(state, size, ("cpu", "gpu"), loader, extra=compare)
    best = {path: max(values) for path, values in rates.items()}
    # nvJPEG and libjpeg-turbo round the IDCT and chroma upsampling differently: a level or two on average
    close = pixels["mean_abs_diff"] < 2.0 if cuda else pixels["max_abs_diff"] == 0
    return {"decoder": "nvjpeg (torchvision)" if cuda else "megaface host decoder (no CUDA: plumbing only)",
            "network": size["input_net"], "batch_per_rank": size["input_batch"], "workers": size["input_workers"],
            **pixels, "samples_per_s": {path: [round(v, 1) for v in values] for path, values in rates.items()},
            "gpu_over_cpu": round(best["gpu"] / best["cpu"], 3),
            "bytes_per_image_to_device": {"cpu": 3 * 112 * 112, "gpu": pixels["jpeg_bytes_per_image"]},
            "ok": close and all(best.values())}


def _raw_pool(state: Any, batch: int, classes: int, count: int = 4) -> list[tuple[Any, torch.Tensor]]:
    """uint8 batches already on the device, as the new input path hands them to train_step."""
    from megaface.data.augment import Augment, RawBatch

    gen = torch.Generator().manual_seed(4321 + state.rank)
    return [(RawBatch(torch.randint(0, 256, (batch, 3, 112, 112), generator=gen, dtype=torch.uint8).to(state.device),
                      None, Augment()),
             torch.randint(0, classes, (batch,), generator=gen).to(state.device)) for _ in range(count)]


def _site(stack: list[traceback.FrameSummary], filename: str, lineno: int) -> str:
    """The innermost frame of megaface or DeepSpeed that led to a sync, as package/path.py:line function."""
    for frame in reversed(stack):
        for package in ("/megaface/", "/deepspeed/"):
            if package in frame.filename:
                where = package.strip("/") + "/" + frame.filename.split(package, 1)[1]
                return f"{where}:{frame.lineno} {frame.name}"
    return f"{filename}:{lineno}"


def check_syncs(state: Any, size: dict[str, Any]) -> dict[str, Any]:
    from megaface.train.step import read_losses, train_step

    if state.device.type != "cuda":
        return {"skipped": "no CUDA device: torch.cuda.set_sync_debug_mode exists only there (on CPU "
                           "tests/unit/test_step_syncs.py counts the step's host reads)", "ok": True}
    batch, steps, classes = 128, 10, 100_000
    parts = build_parts_for(state, "mobilefacenet", ROOT / "ds_configs" / "zero1_bf16.json", [], batch, classes, 0.1,
                            None)
    pool = _raw_pool(state, batch, classes)
    read_losses([train_step(parts, *pool[i % 4]) for i in range(3)], parts, 0)
    torch.cuda.synchronize()
    sites: collections.Counter[str] = collections.Counter()

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" in str(message):
            sites[_site(traceback.extract_stack()[:-1], filename, lineno)] += 1

    pending = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pending = [train_step(parts, *pool[i % 4]) for i in range(steps)]
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    read_losses(pending, parts, 3)
    del parts
    own = {site: count for site, count in sites.items() if site.startswith("megaface/")}
    own_per_step = sum(own.values()) / steps
    return {"steps": steps, "syncs_per_step": round(sum(sites.values()) / steps, 2),
            "megaface_syncs_per_step": round(own_per_step, 2), "documented": DOCUMENTED_SYNCS,
            "sites": dict(sites.most_common()),
            "ok": own_per_step <= DOCUMENTED_SYNCS and all(site.startswith("megaface/head/") for site in own)}


def check_compile(state: Any, size: dict[str, Any]) -> dict[str, Any]:
    from megaface.train.step import read_losses, train_step

    batch, steps, classes = size["compile_batch"], size["compile_steps"], 1000
    out: dict[str, Any] = {"network": size["compile_net"], "batch_per_rank": batch}
    losses = {}
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        parts = build_parts_for(state, size["compile_net"], ROOT / "ds_configs" / "zero1_bf16.json", [], batch,
                                classes, 1.0, None, config_overrides=[f"--model.compile={str(compiled).lower()}"])
        pool = _pool(state, batch, classes)
        started = time.perf_counter()
        losses[name] = read_losses([train_step(parts, *pool[i % 4]) for i in range(3)], parts, 0)
        first = time.perf_counter() - started
        started = time.perf_counter()
        read_losses([train_step(parts, *pool[i % 4]) for i in range(steps)], parts, 3)
        out[name] = {"first_3_steps_s": round(first, 2),
                     "samples_per_s": round(batch * state.world_size * steps / (time.perf_counter() - started), 1),
                     "losses": [round(v, 5) for v in losses[name]]}
        del parts
    # the first loss comes from the same weights and batch; later ones follow bf16 updates, which drift apart
    close = abs(losses["eager"][0] - losses["compiled"][0]) <= 1e-2 * abs(losses["eager"][0])
    out.update(first_loss_close=close, ok=close and all(math.isfinite(v) for v in losses["compiled"]))
    return out


def _guarded(name: str, fn: Callable[[], Any]) -> tuple[Any, bool]:
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - one failed check must not hide the others
        return {"error": f"{type(err).__name__}: {err}"}, False
    flat = result if isinstance(result, list) else [result]
    return result, all(r.get("ok", True) for r in flat if isinstance(r, dict))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny sizes, bf16 only")
    parser.add_argument("--only", default=None, help="comma list of checks to run (default: all; the dry run "
                        "leaves out compile)")
    args = parser.parse_args(argv)
    from megaface.distributed import init_distributed, shutdown

    started = time.perf_counter()
    state = init_distributed(backend="gloo" if args.dry_run else None, require_group=True)
    if not args.dry_run and state.device.type == "cpu":
        print(json.dumps({"ok": False, "error": "no accelerator visible: use --dry-run on a CPU machine"}))
        return 2
    size = _sizes(args.dry_run)
    checks = {"train": lambda: check_train(state, size), "overflow": lambda: check_overflow(state, size, args.dry_run),
              "speed": lambda: check_speed(state, size), "input": lambda: check_input(state, size),
              "syncs": lambda: check_syncs(state, size), "compile": lambda: check_compile(state, size),
              "decode": lambda: check_decode(state, size)}
    summary: dict[str, Any] = {"device": str(state.device), "dry_run": args.dry_run}
    ok = True
    try:
        names = args.only or ("train,overflow,speed,input,syncs,decode" if args.dry_run else ",".join(checks))
        for name in names.split(","):
            summary[name], passed = _guarded(name, checks[name])
            ok = ok and passed
    finally:
        shutdown()
    summary.update(ok=ok, seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
