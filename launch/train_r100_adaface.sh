#!/usr/bin/env bash
# AdaFace on faces_emore (MS1MV2) as its repository trains it: IResNet-100, AdaFace margin, crop /
# low-resolution / photometric augmentations (configs/faces_emore_r100_adaface.yaml, docs/heads.md).
# Settings come from the environment (NODES, GPUS_PER_NODE, PER_GPU_BATCH, HOSTFILE, LAUNCHER, DATA_DIR,
# OUTPUT, DS_CONFIG, ...: see launch/train.sh); arguments go to `megaface train`. Example:
#   NODES=1 GPUS_PER_NODE=8 DATA_DIR=/data/faces_emore launch/train_r100_adaface.sh --max-steps 2000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$here/configs/faces_emore_r100_adaface.yaml}" exec "$here/train.sh" "$@"
