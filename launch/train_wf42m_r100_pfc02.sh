#!/usr/bin/env bash
# arcface_torch WebFace42M IResNet-100, model-parallel FC7 with Partial FC 0.2, SGD, polynomial lr, 20 epochs.
# Settings come from the environment (NODES, GPUS_PER_NODE, PER_GPU_BATCH, HOSTFILE, LAUNCHER, DATA_DIR,
# OUTPUT, DS_CONFIG, ...: see launch/train.sh); arguments go to `megaface train`. Example:
#   NODES=1 GPUS_PER_NODE=8 DATA_DIR=/data/webface42m launch/train_wf42m_r100_pfc02.sh --max-steps 2000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$here/configs/wf42m_r100_pfc02.yaml}" exec "$here/train.sh" "$@"
