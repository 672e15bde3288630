#!/usr/bin/env bash
# The quickstart in one command: train on NPROC CPU ranks with torchrun (built-in synthetic identities,
# validation on identities never seen in training), then print the best Accuracy-Flip, the model file and
# the next command to try.
#
#   bash launch/quickstart.sh                                  # about 3-5 minutes on 2 cores
#   CONFIG=launch/configs/quickstart_long.yaml bash launch/quickstart.sh      # the longer curve to ~0.97
#   bash launch/quickstart.sh --max-steps 20 --validation.interval=10        # any `megaface train` argument
#
# Environment (default in brackets):
#   CONFIG       experiment YAML                       [launch/configs/quickstart.yaml]
#   OUTPUT       run directory                         [runs/quickstart]
#   NPROC        ranks on this machine                 [2]
#   MASTER_PORT  rendezvous port                       [29500]
#   PYTHON       interpreter                           [python]
# Arguments go to `megaface train` after --config/--output, so they win. A progress bar with an ETA shows
# when the output is a terminal; piped output (| tee log) stays plain log lines.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$here/configs/quickstart.yaml}"
OUTPUT="${OUTPUT:-runs/quickstart}"
NPROC="${NPROC:-2}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python}"
# one thread per rank: the ranks share the cores (and torchrun warns when this is unset)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

die() { echo "launch/quickstart.sh: $*" >&2; exit 2; }
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC='$NPROC' must be a positive integer"
[[ -f "$CONFIG" ]] || die "CONFIG='$CONFIG' does not exist (see launch/configs/)"

start=$SECONDS
"$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" --master_addr 127.0.0.1 \
  --master_port "$MASTER_PORT" -m megaface train --config "$CONFIG" --output "$OUTPUT" "$@"
"$PYTHON" -m megaface summary "$OUTPUT" --seconds "$(( SECONDS - start ))"
