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
The device and backend come from megaface's distributed state (cuda + nccl when a GPU is visible).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ROOT, build_parts_for  # noqa: E402 - benchmarks/ is not a package

IRESNET100_MACS = 12.1e9  # multiply-adds of one 112x112 forward


def _sizes(dry: bool) -> dict[str, Any]:
    if dry:
        return {"nets": ["mobilefacenet_tiny"], "train_steps": 30, "batch": 8, "classes": 64, "speed_net":
                "mobilefacenet_tiny", "speed_batch": 4, "speed_steps": 2, "head_classes": [1000, 10_000],
                "precisions": ["bf16"]}
    return {"nets": ["iresnet100", "mobilefacenet"], "train_steps": 100, "batch": 64, "classes": 1000,
            "speed_net": "iresnet100", "speed_batch": 128, "speed_steps": 20,
            "head_classes": [1_000_000, 10_000_000], "precisions": ["bf16", "fp16"]}


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
    parser.add_argument("--only", default="train,overflow,speed", help="comma list of checks to run")
    args = parser.parse_args(argv)
    from megaface.distributed import init_distributed, shutdown

    started = time.perf_counter()
    state = init_distributed(backend="gloo" if args.dry_run else None, require_group=True)
    if not args.dry_run and state.device.type == "cpu":
        print(json.dumps({"ok": False, "error": "no accelerator visible: use --dry-run on a CPU machine"}))
        return 2
    size = _sizes(args.dry_run)
    checks = {"train": lambda: check_train(state, size), "overflow": lambda: check_overflow(state, size, args.dry_run),
              "speed": lambda: check_speed(state, size)}
    summary: dict[str, Any] = {"device": str(state.device), "dry_run": args.dry_run}
    ok = True
    try:
        for name in args.only.split(","):
            summary[name], passed = _guarded(name, checks[name])
            ok = ok and passed
    finally:
        shutdown()
    summary.update(ok=ok, seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
