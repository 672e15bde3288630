#!/usr/bin/env bash
# arcface_torch WebFace12M-Conflict IResNet-50, Partial FC 0.3 + inter-class filtering 0.4, 20 epochs.
# Settings come from the environment (NODES, GPUS_PER_NODE, PER_GPU_BATCH, HOSTFILE, LAUNCHER, DATA_DIR,
# OUTPUT, DS_CONFIG, ...: see launch/train.sh); arguments go to `megaface train`. Example:
#   NODES=1 GPUS_PER_NODE=8 DATA_DIR=/data/webface12m_conflict launch/train_wf12m_conflict_r50_pfc03_filter.sh --max-steps 2000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$here/configs/wf12m_conflict_r50_pfc03_filter.yaml}" exec "$here/train.sh" "$@"
