#!/usr/bin/env bash
# One-GPU readiness check: 1-rank NCCL training (iresnet100, mobilefacenet; zero1_bf16, zero1_fp16), an injected
# fp16 overflow, iresnet100 bf16 samples/s + MFU, the head alone at 1M / 10M classes, the old vs new input path,
# host syncs per step by call site, model.compile and data.decode=gpu (nvJPEG) (see benchmarks/gpu_check.py). Prints one JSON line; exit 0
# when every check passed. Sized for one H100/H200 within the limit below; it has not run on a GPU yet.
#   PEAK_BF16_FLOPS   dense bf16 peak of the device for the MFU (default 989e12: H100/H200 SXM)
#   HEAD_SAMPLE_RATE  Partial FC sample rate of the head-only timing (default 0.1)
#   GPU_CHECK_TIMEOUT_S  hard limit (default 570)
# Extra arguments go to benchmarks/gpu_check.py (e.g. --dry-run on a CPU machine, --only train,overflow).
set -euo pipefail
cd "$(dirname "$0")/.."
export PEAK_BF16_FLOPS="${PEAK_BF16_FLOPS:-989e12}"
export HEAD_SAMPLE_RATE="${HEAD_SAMPLE_RATE:-0.1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT_S:-570}" python benchmarks/gpu_check.py "$@"
