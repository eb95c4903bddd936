#!/usr/bin/env bash
# Pruning-aware pretraining, launched with the deepspeed launcher.
#
#   launchers/pretrain_prune.sh CONFIG.yaml [key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: number of GPUs, or 1 on a CPU-only machine)
#   NNODES          number of nodes (default 1); with more than one, HOSTFILE is required
#   HOSTFILE        deepspeed hostfile ("host slots=N" lines)
#   MASTER_ADDR / MASTER_PORT   rendezvous (default: first host / 29500)
#   EFFLLM_LAUNCHER  "deepspeed" (default) or "torchrun" (e.g. inside an srun step)
# Key=value overrides use dotted names, e.g. prune.interval=2 run_dir=runs/try1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
CONFIG="$1"; shift
if [ ! -f "$CONFIG" ]; then
  echo "error: config file $CONFIG not found (see configs/ for recipes)" >&2
  exit 2
fi
source "$ROOT/tools/ensure_env.sh"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python - <<'PY'
import torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 1)
PY
)
fi
NNODES="${NNODES:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ "$NPROC_PER_NODE" -gt 1 ] && ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"
fi
# The training job is the module behind effllm-train; both launchers run it as `python -m`.
MODULE=megatron_effllm.cli.train
case "${EFFLLM_LAUNCHER:-deepspeed}" in
  deepspeed)
    ARGS=(--num_nodes "$NNODES" --master_port "$MASTER_PORT")
    if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
      ARGS+=(--num_gpus "$NPROC_PER_NODE")
    else
      ARGS+=(--num_accelerators "$NPROC_PER_NODE")
    fi
    if [ -n "${HOSTFILE:-}" ]; then
      ARGS+=(--hostfile "$HOSTFILE")
      [ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
    elif [ "$NNODES" -gt 1 ]; then
      echo "error: NNODES=$NNODES needs HOSTFILE (a deepspeed hostfile with one 'host slots=N' line per node)" >&2
      exit 2
    fi
    exec deepspeed "${ARGS[@]}" --module "$MODULE" --config "$CONFIG" "$@"
    ;;
  torchrun)
    exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
      --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:$MASTER_PORT" \
      -m "$MODULE" --config "$CONFIG" "$@"
    ;;
  *)
    echo "error: EFFLLM_LAUNCHER must be deepspeed or torchrun, got ${EFFLLM_LAUNCHER}" >&2
    exit 2
    ;;
esac
