#!/usr/bin/env bash
# Seed run 3: IResNet-100 (512-d) on faces_emore, data-parallel FC7 (replicated in the DeepSpeed engine).
# Settings come from the environment (NODES, GPUS_PER_NODE, PER_GPU_BATCH, HOSTFILE, LAUNCHER, DATA_DIR,
# OUTPUT, DS_CONFIG, ...: see launch/train.sh); arguments go to `megaface train`. Example:
#   NODES=1 GPUS_PER_NODE=8 DATA_DIR=/data/faces_emore launch/train_r100_dp.sh --max-steps 2000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$here/configs/faces_emore_r100_dp.yaml}" exec "$here/train.sh" "$@"
