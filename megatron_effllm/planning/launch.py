"""The command lines that start the planned run, as ``launchers/pretrain_prune.sh`` and
``launchers/slurm/pretrain_prune.sbatch`` run them (one place to keep in step with them)."""
from __future__ import annotations

import shlex

from megatron_effllm.planning.ranks import Layout

MODULE = "megatron_effllm.cli.train"  # what both launchers start with `python -m`
MASTER_PORT = 29500


def launch_commands(config: str, overrides: list[str], lay: Layout) -> dict:
    """{"launcher", "deepspeed", "torchrun", "sbatch", "srun"}; ``HOSTFILE``, ``MASTER_ADDR`` and
    the slurm job's variables stay as variables (they name the user's machines and job)."""
    args = " ".join(shlex.quote(a) for a in [config, *overrides])
    ds = f"deepspeed --num_nodes {lay.nodes} --master_port {MASTER_PORT} --num_gpus {lay.gpus_per_node}"
    if lay.nodes > 1:  # with a hostfile the launcher passes MASTER_ADDR on when it is set
        ds += ' --hostfile "$HOSTFILE" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"}'
    step_args = " ".join(shlex.quote(a) for a in [config, "resume=auto", *overrides])
    # what each node of the sbatch job's step runs (the step passes resume=auto first)
    torchrun = (f"torchrun --nnodes {lay.nodes} --nproc_per_node {lay.gpus_per_node} "
                '--rdzv_id "${SLURM_JOB_ID:-effllm}" --rdzv_backend c10d '
                f'--rdzv_endpoint "${{MASTER_ADDR:-127.0.0.1}}:{MASTER_PORT}" -m {MODULE} --config {step_args}')
    # the sbatch template's step: resume=auto first, so the user's overrides (resume=none) win
    srun = (f"srun --export=ALL --kill-on-bad-exit=1 --nodes={lay.nodes} --ntasks-per-node=1 "
            f'--cpus-per-task="$SLURM_CPUS_PER_TASK" bash launchers/pretrain_prune.sh {step_args}')
    return {
        "launcher": (f"NNODES={lay.nodes} NPROC_PER_NODE={lay.gpus_per_node}"
                     + (' HOSTFILE="$HOSTFILE"' if lay.nodes > 1 else "") + f" launchers/pretrain_prune.sh {args}"),
        "deepspeed": f"{ds} --module {MODULE} --config {args}",
        "torchrun": torchrun,
        "sbatch": f"sbatch --nodes {lay.nodes} --gpus-per-node {lay.gpus_per_node} launchers/slurm/pretrain_prune.sbatch {args}",
        "srun": srun,
    }
