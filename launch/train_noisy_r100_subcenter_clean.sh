#!/usr/bin/env bash
# Sub-center ArcFace's three phases on a noisy pack (Deng et al., ECCV 2020; docs/heads.md):
#   1. train K = 3 sub-centers per class          (configs/noisy_r100_subcenter3.yaml)   -> $OUTPUT/k3
#   2. megaface clean: drop samples > THRESHOLD_DEG from their class's dominant sub-center, then classes
#      under MIN_IMAGES                                                                   -> $OUTPUT/cleaned
#   3. retrain plain ArcFace (K = 1) on the cleaned pack (configs/noisy_r100_retrain.yaml) -> $OUTPUT/k1
#
#   DATA_DIR=/data/ms1mv0 GPUS_PER_NODE=8 OUTPUT=runs/noisy launch/train_noisy_r100_subcenter_clean.sh
#   DRY_RUN=1 DATA_DIR=/data/ms1mv0 launch/train_noisy_r100_subcenter_clean.sh     # the three commands
#
# Environment (default in brackets), besides launch/train.sh's (NODES, GPUS_PER_NODE, LAUNCHER, ...):
#   DATA_DIR        the noisy training pack (also holding lfw.bin, cfp_fp.bin, agedb_30.bin)   [required]
#   OUTPUT          root of the three outputs                                    [output/noisy_r100]
#   CONFIG          phase 1 recipe                          [launch/configs/noisy_r100_subcenter3.yaml]
#   RETRAIN_CONFIG  phase 3 recipe                          [launch/configs/noisy_r100_retrain.yaml]
#   THRESHOLD_DEG   phase 2 angle threshold in degrees (the paper's)                               [75]
#   MIN_IMAGES      phase 2: classes left with fewer images are dropped                            [2]
#   CLEAN_NPROC     ranks that embed the pack in phase 2 (torchrun on this node)       [GPUS_PER_NODE]
#   PHASES          which phases to run, e.g. "2 3" after phase 1 finished                     ["1 2 3"]
# Arguments go to `megaface train` of phases 1 and 3 (after the recipe's, so they win).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_DIR="${DATA_DIR:-}"
OUTPUT="${OUTPUT:-output/noisy_r100}"
CONFIG="${CONFIG:-$here/configs/noisy_r100_subcenter3.yaml}"
RETRAIN_CONFIG="${RETRAIN_CONFIG:-$here/configs/noisy_r100_retrain.yaml}"
THRESHOLD_DEG="${THRESHOLD_DEG:-75}"
MIN_IMAGES="${MIN_IMAGES:-2}"
CLEAN_NPROC="${CLEAN_NPROC:-${GPUS_PER_NODE:-8}}"
PHASES="${PHASES:-1 2 3}"
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"

die() { echo "launch/train_noisy_r100_subcenter_clean.sh: $*" >&2; exit 2; }
[[ -n "$DATA_DIR" ]] || die "DATA_DIR is not set: give the noisy training pack (train.rec/.idx/property)"
[[ "$CLEAN_NPROC" =~ ^[1-9][0-9]*$ ]] || die "CLEAN_NPROC='$CLEAN_NPROC' must be a positive integer"
for phase in $PHASES; do [[ "$phase" =~ ^[123]$ ]] || die "PHASES='$PHASES' may list only 1, 2 and 3"; done

run() { if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi; }

for phase in $PHASES; do
  case "$phase" in
    1) CONFIG="$CONFIG" OUTPUT="$OUTPUT/k3" DATA_DIR="$DATA_DIR" "$here/train.sh" "$@" ;;
    2) run "$PYTHON" -m torch.distributed.run --nproc_per_node "$CLEAN_NPROC" -m megaface clean \
         --checkpoint "$OUTPUT/k3" --pack "$DATA_DIR" --output "$OUTPUT/cleaned" \
         --threshold-deg "$THRESHOLD_DEG" --min-images "$MIN_IMAGES" ;;
    3) CONFIG="$RETRAIN_CONFIG" OUTPUT="$OUTPUT/k1" DATA_DIR="$DATA_DIR" "$here/train.sh" \
         --data.path="$OUTPUT/cleaned" "$@" ;;
  esac
done
