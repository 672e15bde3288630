#!/usr/bin/env bash
# IResNet-100 on MS1MV3 (93,431 identities), model-parallel FC7, training length in epochs.
# Settings come from the environment (NODES, GPUS_PER_NODE, PER_GPU_BATCH, HOSTFILE, LAUNCHER, DATA_DIR,
# OUTPUT, DS_CONFIG, ...: see launch/train.sh); arguments go to `megaface train`. Example:
#   NODES=1 GPUS_PER_NODE=8 DATA_DIR=/data/faces_emore launch/train_ms1mv3_r100.sh --max-steps 2000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$here/configs/ms1mv3_r100.yaml}" exec "$here/train.sh" "$@"
