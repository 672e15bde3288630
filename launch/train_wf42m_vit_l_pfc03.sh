#!/usr/bin/env bash
# arcface_torch WebFace42M ViT-L (vit_l), Partial FC 0.3, AdamW lr 1e-3 wd 0.1, polynomial lr, 40 epochs.
# Settings come from the environment (NODES, GPUS_PER_NODE, PER_GPU_BATCH, HOSTFILE, LAUNCHER, DATA_DIR,
# OUTPUT, DS_CONFIG, ...: see launch/train.sh); arguments go to `megaface train`. Example:
#   NODES=1 GPUS_PER_NODE=8 DATA_DIR=/data/webface42m launch/train_wf42m_vit_l_pfc03.sh --max-steps 2000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$here/configs/wf42m_vit_l_pfc03.yaml}" exec "$here/train.sh" "$@"
