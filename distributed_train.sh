#!/usr/bin/env bash
# Launch train.py on NUM_PROC processes per node with torchrun.
#
# Usage: ./distributed_train.sh NUM_PROC [train.py args ...]
#
# Single node: nothing else to set (a free local port is used unless MASTER_PORT is set).
# Multi-node, static: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node (no restarts), or
# multi-node, elastic: pass torchrun's rendezvous flags (--rdzv-backend/--rdzv_backend, --rdzv-endpoint, --rdzv-id,
# --nnodes MIN:MAX, ...) among the arguments; they go to torchrun, everything else to train.py.
# MAX_RESTARTS=N lets torchrun restart the workers N times after a failure; together with --auto-resume the restarted
# job continues from the newest checkpoint of its run folder (give --experiment so the folder name is fixed).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NUM_PROC [train.py args ...]  (NUM_PROC: processes per node, e.g. the number of GPUs)" >&2
    exit 2
fi
NUM_PROC=$1
shift

passthrough=()
train_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rdzv[-_]*=* | --nnodes=* | --node[-_]rank=* | --master[-_]addr=* | --master[-_]port=* | --max[-_]restarts=*)
            passthrough+=("$1")
            shift
            ;;
        --rdzv[-_]* | --nnodes | --node[-_]rank | --master[-_]addr | --master[-_]port | --max[-_]restarts)
            if [[ $# -lt 2 ]]; then
                echo "$0: $1 needs a value" >&2
                exit 2
            fi
            passthrough+=("$1" "$2")
            shift 2
            ;;
        *)
            train_args+=("$1")
            shift
            ;;
    esac
done

# Workers of a restarted attempt get a fresh TCPStore: on torchrun's shared rendezvous store they read the
# previous attempt's stale gloo/nccl addresses and fail to connect (seen with torch 2.14).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
launcher_args=(--nproc-per-node="$NUM_PROC" --max-restarts="${MAX_RESTARTS:-0}")
if [[ " ${passthrough[*]-} " == *" --rdzv"* ]]; then
    :  # the caller's rendezvous flags decide
elif [[ "${NNODES:-1}" != 1 ]]; then
    launcher_args+=(--nnodes="$NNODES" --node-rank="${NODE_RANK:?NODE_RANK must be set when NNODES > 1}"
                    --master-addr="${MASTER_ADDR:?MASTER_ADDR must be set when NNODES > 1}"
                    --master-port="${MASTER_PORT:-29500}")
elif [[ -n "${MASTER_PORT:-}" ]]; then
    launcher_args+=(--rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:$MASTER_PORT")
else
    launcher_args+=(--standalone)
fi

# passed-through flags come last, so they win over the defaults above
exec "${PYTHON:-python}" -m torch.distributed.run "${launcher_args[@]}" ${passthrough[@]+"${passthrough[@]}"} \
    "$(dirname "$0")/train.py" ${train_args[@]+"${train_args[@]}"}
