#!/usr/bin/env bash
# Start `megaface train` on NODES x GPUS_PER_NODE ranks through one launcher.
#
#   CONFIG=launch/configs/faces_emore_r100_mp_pfc.yaml NODES=2 HOSTFILE=launch/hostfile \
#       launch/train.sh --max-steps 1000
#
# Environment (default in brackets):
#   CONFIG         experiment YAML                                [launch/configs/quickstart.yaml]
#   DS_CONFIG      DeepSpeed JSON; empty = the YAML's train.ds_config          []
#   NODES          number of nodes                                 [1]
#   GPUS_PER_NODE  ranks per node (one per GPU)                    [8]
#   PER_GPU_BATCH  micro batch per rank; empty = the JSON's train_micro_batch_size_per_gpu []
#   HOSTFILE       "<host> slots=N" lines (deepspeed, mpirun); required when NODES > 1 []
#   LAUNCHER       deepspeed | torchrun | mpirun | python          [deepspeed]
#   MASTER_ADDR    rank 0's address                [127.0.0.1 on one node; see docs/multinode.md]
#   MASTER_PORT    rendezvous port                                 [29500]
#   NODE_RANK      torchrun only: this node's index (start the script on every node) [0]
#   OUTPUT         run directory, passed as --output               []
#   DATA_DIR       training pack directory that also holds lfw.bin, cfp_fp.bin, agedb_30.bin []
#   PYTHON         interpreter for the python and mpirun launchers [python]
#   LAUNCHER_ARGS  extra arguments for the launcher itself (split on spaces) []
#   DRY_RUN        1 = print the command instead of running it     [0]
#   NODE_IPS       "ip1,ip2,...": with NODES > 1 and no HOSTFILE, a hostfile of the first NODES of them []
#   MODEL_LOAD_DIR backbone file, or OneFlow snapshot dir (imported once), to start from (model.init_from) []
#   NETWORK        network of a OneFlow snapshot in MODEL_LOAD_DIR [the CONFIG's model.network]
# The seed's positional arguments come first when given (its insightface_*_train.sh order):
#   launch/train_r100_mp_pfc.sh [NODES [GPUS_PER_NODE [PER_GPU_BATCH [NODE_IPS [MODEL_LOAD_DIR]]]]] [--options]
# All other arguments go to `megaface train` unchanged, after the ones built here, so they win.
set -euo pipefail

seed_args=()
while (( $# )) && [[ "$1" != -* ]] && (( ${#seed_args[@]} < 5 )); do seed_args+=("$1"); shift; done
if (( ${#seed_args[@]} )); then
  NODES="${seed_args[0]}"
  [[ -n "${seed_args[1]:-}" ]] && GPUS_PER_NODE="${seed_args[1]}"
  [[ -n "${seed_args[2]:-}" ]] && PER_GPU_BATCH="${seed_args[2]}"
  [[ -n "${seed_args[3]:-}" ]] && NODE_IPS="${seed_args[3]}"
  [[ -n "${seed_args[4]:-}" ]] && MODEL_LOAD_DIR="${seed_args[4]}"
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${CONFIG:-$here/configs/quickstart.yaml}"
DS_CONFIG="${DS_CONFIG:-}"
NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PER_GPU_BATCH="${PER_GPU_BATCH:-}"
HOSTFILE="${HOSTFILE:-}"
LAUNCHER="${LAUNCHER:-deepspeed}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
NODE_RANK="${NODE_RANK:-0}"
OUTPUT="${OUTPUT:-}"
DATA_DIR="${DATA_DIR:-}"
PYTHON="${PYTHON:-python}"
LAUNCHER_ARGS="${LAUNCHER_ARGS:-}"
DRY_RUN="${DRY_RUN:-0}"
NODE_IPS="${NODE_IPS:-}"
MODEL_LOAD_DIR="${MODEL_LOAD_DIR:-}"
NETWORK="${NETWORK:-}"

die() { echo "launch/train.sh: $*" >&2; exit 2; }

for name in NODES GPUS_PER_NODE MASTER_PORT NODE_RANK; do
  [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name='${!name}' must be a non-negative integer"
done
(( NODES >= 1 && GPUS_PER_NODE >= 1 )) || die "NODES and GPUS_PER_NODE must be >= 1"
[[ -f "$CONFIG" ]] || die "CONFIG='$CONFIG' does not exist (set CONFIG=launch/configs/<experiment>.yaml)"
[[ -z "$DS_CONFIG" || -f "$DS_CONFIG" ]] || die "DS_CONFIG='$DS_CONFIG' does not exist (see ds_configs/README.md)"
if [[ -n "$HOSTFILE" && ! -f "$HOSTFILE" ]]; then
  die "HOSTFILE='$HOSTFILE' does not exist (copy launch/hostfile.example and list your nodes)"
fi
if (( NODES > 1 )) && [[ -z "$HOSTFILE" && -n "$NODE_IPS" ]]; then
  IFS=, read -r -a ips <<< "$NODE_IPS"
  (( ${#ips[@]} >= NODES )) || die "NODE_IPS='$NODE_IPS' lists ${#ips[@]} address(es) for NODES=$NODES"
  HOSTFILE="$(mktemp "${TMPDIR:-/tmp}/megaface_hostfile.XXXXXX")"
  for (( i = 0; i < NODES; i++ )); do echo "${ips[i]} slots=$GPUS_PER_NODE" >> "$HOSTFILE"; done
  MASTER_ADDR="${MASTER_ADDR:-${ips[0]}}"
fi
if (( NODES > 1 )) && [[ -z "$HOSTFILE" && "$LAUNCHER" != torchrun ]]; then
  die "NODES=$NODES needs HOSTFILE=<file with one '<host> slots=$GPUS_PER_NODE' line per node>"
fi
if [[ -n "$PER_GPU_BATCH" && ! "$PER_GPU_BATCH" =~ ^[1-9][0-9]*$ ]]; then
  die "PER_GPU_BATCH='$PER_GPU_BATCH' must be a positive integer"
fi
# One node talks over loopback; with several, the address must be one every node can reach.
if [[ -z "$MASTER_ADDR" ]] && (( NODES == 1 )); then MASTER_ADDR=127.0.0.1; fi

# ---- arguments for `megaface train` ----
train_args=(train --config "$CONFIG")
[[ -n "$DS_CONFIG" ]] && train_args+=(--ds-config "$DS_CONFIG")
[[ -n "$PER_GPU_BATCH" ]] && train_args+=(--ds.train_micro_batch_size_per_gpu="$PER_GPU_BATCH")
[[ -n "$OUTPUT" ]] && train_args+=(--output "$OUTPUT")
if [[ -n "$DATA_DIR" ]]; then
  train_args+=(--data.source=recordio --data.path="$DATA_DIR"
    "--validation.bins=[\"$DATA_DIR/lfw.bin\", \"$DATA_DIR/cfp_fp.bin\", \"$DATA_DIR/agedb_30.bin\"]")
fi
if [[ -n "$MODEL_LOAD_DIR" ]]; then
  [[ -e "$MODEL_LOAD_DIR" ]] || die "MODEL_LOAD_DIR='$MODEL_LOAD_DIR' does not exist"
  init="$MODEL_LOAD_DIR"
  if [[ -d "$MODEL_LOAD_DIR" ]]; then  # a OneFlow snapshot (one directory per variable): import it once
    if [[ -z "$NETWORK" ]]; then
      NETWORK="$("$PYTHON" -c 'import sys; from megaface.config import load_config
print(load_config(sys.argv[1]).model.network)' "$CONFIG")"
    fi
    init="${OUTPUT:-.}/imported_$(basename "$MODEL_LOAD_DIR")_$NETWORK.safetensors"
    import=("$PYTHON" -m megaface convert import-oneflow "$MODEL_LOAD_DIR" --network "$NETWORK" -o "$init")
    if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "${import[@]}"; printf '\n'
    elif [[ ! -f "$init" ]]; then "${import[@]}" >&2; fi
  fi
  train_args+=(--model.init_from="$init")
fi
train_args+=("$@")
read -r -a extra <<< "$LAUNCHER_ARGS"

# ---- the launcher ----
case "$LAUNCHER" in
  deepspeed)
    cmd=(deepspeed)
    [[ -n "$HOSTFILE" ]] && cmd+=(--hostfile "$HOSTFILE")
    cmd+=(--num_nodes "$NODES" --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
    # Without an address DeepSpeed asks the first host over ssh (`hostname -I`).
    [[ -n "$MASTER_ADDR" ]] && cmd+=(--master_addr "$MASTER_ADDR")
    # A one-node hostfile needs no ssh at all, but DeepSpeed checks it unless told not to.
    (( NODES == 1 )) && cmd+=(--no_ssh_check)
    # Ranks read LOCAL_RANK from the environment; no --local_rank argument is appended.
    cmd+=(--no_local_rank "${extra[@]}" --module megaface "${train_args[@]}")
    ;;
  torchrun)
    if (( NODES > 1 )) && [[ -z "$MASTER_ADDR" ]]; then
      die "LAUNCHER=torchrun with NODES=$NODES needs MASTER_ADDR (node 0's address, same on every node)"
    fi
    cmd=(torchrun --nnodes "$NODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK"
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${extra[@]}" -m megaface "${train_args[@]}")
    ;;
  mpirun)
    cmd=(mpirun -np "$(( NODES * GPUS_PER_NODE ))")
    # OpenMPI refuses to start as root unless asked explicitly (containers often run as root).
    (( EUID == 0 )) && cmd+=(--allow-run-as-root)
    [[ -n "$HOSTFILE" ]] && cmd+=(--hostfile "$HOSTFILE" --map-by "ppr:${GPUS_PER_NODE}:node")
    # OpenMPI pins each rank to one core or socket by default; data-loader workers need the whole node.
    cmd+=(--bind-to none)
    # Remote ranks start with ssh's bare environment: forward what the job needs.
    export MASTER_ADDR MASTER_PORT
    for var in $(compgen -e); do
      case "$var" in
        PATH|LD_LIBRARY_PATH|PYTHONPATH|VIRTUAL_ENV|MASTER_ADDR|MASTER_PORT|NCCL_*|GLOO_*|OMP_NUM_THREADS)
          [[ -n "${!var}" ]] && cmd+=(-x "$var") ;;
      esac
    done
    cmd+=("${extra[@]}" "$PYTHON" -m megaface "${train_args[@]}")
    ;;
  python)
    if (( NODES * GPUS_PER_NODE > 1 )); then
      echo "launch/train.sh: LAUNCHER=python starts one process (NODES/GPUS_PER_NODE ignored)" >&2
    fi
    cmd=("$PYTHON" "${extra[@]}" -m megaface "${train_args[@]}")
    ;;
  *)
    die "LAUNCHER='$LAUNCHER' is not one of deepspeed, torchrun, mpirun, python"
    ;;
esac

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
