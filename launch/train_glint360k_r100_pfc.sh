#!/usr/bin/env bash
# IResNet-100 on Glint360K (360,232 identities), model-parallel FC7 with Partial FC 0.1, length in epochs.
# Settings come from the environment (NODES, GPUS_PER_NODE, PER_GPU_BATCH, HOSTFILE, LAUNCHER, DATA_DIR,
# OUTPUT, DS_CONFIG, ...: see launch/train.sh); arguments go to `megaface train`. Example:
#   NODES=1 GPUS_PER_NODE=8 DATA_DIR=/data/faces_emore launch/train_glint360k_r100_pfc.sh --max-steps 2000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$here/configs/glint360k_r100_pfc.yaml}" exec "$here/train.sh" "$@"
