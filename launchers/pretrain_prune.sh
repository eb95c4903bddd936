#!/usr/bin/env bash
# Pruning-aware pretraining, launched with the deepspeed launcher (or torchrun inside an srun step).
#
#   launchers/pretrain_prune.sh CONFIG.yaml [key=value ...]
#   launchers/pretrain_prune.sh CONFIG.yaml --dry-run nodes=N gpus_per_node=G gpu_mem_gb=M [key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: the GPUs of the node that runs the ranks, from
#                   SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, CUDA_VISIBLE_DEVICES or nvidia-smi;
#                   1 on a CPU-only machine; with HOSTFILE: the hostfile's slots)
#   NNODES          number of nodes (default 1, or the hosts in HOSTFILE); more than one needs HOSTFILE
#   HOSTFILE        deepspeed hostfile ("host slots=N" lines)
#   MASTER_ADDR / MASTER_PORT   rendezvous (default: first host / 29500)
#   EFFLLM_LAUNCHER  "deepspeed" (default) or "torchrun" (e.g. inside an srun step)
# Key=value overrides use dotted names, e.g. prune.interval=2 run_dir=runs/try1. --dry-run prints
# the capacity plan and the launch commands for that cluster shape instead of training.
# Multi-node deepspeed forwards EFFLLM_*, TORCH_*, PYTORCH_*, NCCL_*, GLOO_*, HF_*, OMP_NUM_THREADS,
# CUDA_DEVICE_MAX_CONNECTIONS and TOKENIZERS_PARALLELISM to every node (with ~/.deepspeed_env and
# ./.deepspeed_env), e.g. NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5.
# Inside a slurm job nothing is installed: the environment must exist (bash tools/ensure_env.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
CONFIG="$1"; shift
if [ ! -f "$CONFIG" ]; then
  echo "error: config file $CONFIG not found (see configs/ for recipes)" >&2
  exit 2
fi
if [ -n "${SLURM_JOB_ID:-}" ]; then
  # On a compute node, every node at once: check, never install.
  source "$ROOT/tools/ensure_env.sh" --check-only
else
  source "$ROOT/tools/ensure_env.sh"
fi
if [ "${1:-}" = "--dry-run" ]; then
  shift
  exec python -m megatron_effllm.cli.plan "$CONFIG" "$@"
fi

int_or_die() {  # NAME VALUE: VALUE must be a positive integer
  case "$2" in
    ''|*[!0-9]*|0) echo "error: $1=$2 is not a positive number of processes or GPUs; fix or unset it" >&2; exit 2 ;;
  esac
}

# GPUs on the node running this script (0: none). Inside an srun step that is the node that runs
# the ranks; slurm's count comes first, then the devices this process may see, then the driver.
gpus_on_node() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    int_or_die SLURM_GPUS_ON_NODE "$SLURM_GPUS_ON_NODE"
    echo "$SLURM_GPUS_ON_NODE"
  elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
    # "[type:]count[,[type:]count...]", e.g. h100:8
    local total=0 part count
    IFS=',' read -ra parts <<< "$SLURM_GPUS_PER_NODE"
    for part in "${parts[@]}"; do
      count="${part##*:}"
      int_or_die SLURM_GPUS_PER_NODE "$count"
      total=$((total + count))
    done
    echo "$total"
  elif [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    case "$CUDA_VISIBLE_DEVICES" in
      ''|NoDevFiles|-1) echo 0 ;;
      *) local ids; IFS=',' read -ra ids <<< "$CUDA_VISIBLE_DEVICES"; echo "${#ids[@]}" ;;
    esac
  elif command -v nvidia-smi >/dev/null 2>&1; then
    { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

GPUS="$(gpus_on_node)"
if [ -n "${HOSTFILE:-}" ]; then
  if [ ! -f "$HOSTFILE" ]; then
    echo "error: HOSTFILE $HOSTFILE not found; give a deepspeed hostfile with one 'host slots=N' line per node" >&2
    exit 2
  fi
  NNODES="${NNODES:-$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE" || true)}"
fi
NNODES="${NNODES:-1}"
int_or_die NNODES "$NNODES"
MASTER_PORT="${MASTER_PORT:-29500}"
# With a deepspeed hostfile the launching node may be a login node: its GPU count says nothing
# about the workers, whose slots the hostfile gives.
if [ -z "${NPROC_PER_NODE:-}" ] && { [ -z "${HOSTFILE:-}" ] || [ "${EFFLLM_LAUNCHER:-deepspeed}" != deepspeed ]; }; then
  NPROC_PER_NODE=$(( GPUS > 0 ? GPUS : 1 ))
fi
if [ -n "${NPROC_PER_NODE:-}" ]; then
  int_or_die NPROC_PER_NODE "$NPROC_PER_NODE"
  if [ "$GPUS" -eq 0 ] && [ -z "${HOSTFILE:-}" ] && [ "$NPROC_PER_NODE" -gt 1 ]; then
    # CPU ranks share the cores instead of each starting one thread per core.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"
  fi
fi

# The deepspeed runner passes other nodes only NCCL*, PYTHON*, UCX*, MV2*, MLFLOW* variables and
# the lines of ~/.deepspeed_env and ./.deepspeed_env (DS_ENV_FILE names that file; an absolute
# path is read as is). Writes a per-launch file with those lines and this job's variables.
deepspeed_env_file() {
  local file name
  file="$(mktemp "${TMPDIR:-/tmp}/effllm-deepspeed-env.XXXXXX")"
  {
    for name in "$HOME/.deepspeed_env" ./.deepspeed_env; do
      if [ -f "$name" ]; then grep '=' "$name" || true; fi
    done
    while IFS= read -r name; do
      case "$name" in
        EFFLLM_*|TORCH_*|PYTORCH_*|NCCL_*|GLOO_*|HF_*|OMP_NUM_THREADS|CUDA_DEVICE_MAX_CONNECTIONS|TOKENIZERS_PARALLELISM)
          # The runner reads one line per variable.
          if [[ "${!name}" != *$'\n'* ]]; then printf '%s=%s\n' "$name" "${!name}"; fi ;;
      esac
    done < <(compgen -e | sort)
  } > "$file"
  echo "$file"
}

# The training job is the module behind effllm-train; both launchers run it as `python -m`.
MODULE=megatron_effllm.cli.train
case "${EFFLLM_LAUNCHER:-deepspeed}" in
  deepspeed)
    ARGS=(--num_nodes "$NNODES" --master_port "$MASTER_PORT")
    if [ -n "${NPROC_PER_NODE:-}" ]; then
      ARGS+=(--num_gpus "$NPROC_PER_NODE")
    fi
    if [ -n "${HOSTFILE:-}" ]; then
      ARGS+=(--hostfile "$HOSTFILE")
      if [ -n "${MASTER_ADDR:-}" ]; then ARGS+=(--master_addr "$MASTER_ADDR"); fi
      DS_ENV_FILE="$(deepspeed_env_file)"
      export DS_ENV_FILE
    elif [ "$NNODES" -gt 1 ]; then
      echo "error: NNODES=$NNODES needs HOSTFILE (a deepspeed hostfile with one 'host slots=N' line per node)" >&2
      exit 2
    fi
    exec deepspeed "${ARGS[@]}" --module "$MODULE" --config "$CONFIG" "$@"
    ;;
  torchrun)
    # Under slurm, USR1 (the time-limit warning) reaches every process of the step: the ranks
    # checkpoint and exit 0. torchrun ignores it (inherited) so that it reports their exit 0
    # instead of dying of it; the ranks install their own handler.
    trap '' USR1
    exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
      --rdzv_id "${SLURM_JOB_ID:-effllm}" --rdzv_backend c10d \
      --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:$MASTER_PORT" \
      -m "$MODULE" --config "$CONFIG" "$@"
    ;;
  *)
    echo "error: EFFLLM_LAUNCHER must be deepspeed or torchrun, got ${EFFLLM_LAUNCHER}" >&2
    exit 2
    ;;
esac
