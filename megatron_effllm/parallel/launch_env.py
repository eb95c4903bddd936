"""Who am I in the job: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

torchrun and the deepspeed launcher export these variables. A job started directly by
``srun python ...`` or ``mpirun python ...`` exports only the scheduler's own (``SLURM_*``,
``OMPI_COMM_WORLD_*``); without translation every task would start its own one-process world on
GPU 0 and all of them would write the same run folder. ``resolve`` derives the launcher's
variables from the scheduler's, and refuses in one line when several tasks exist but this
process cannot know which one it is.

Pure functions of an environment mapping, so the rules are testable without a scheduler.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

from megatron_effllm.errors import UserError

DEFAULT_PORT = 29500
LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def first_host(nodelist: str) -> str:
    """The first host of a slurm hostlist (``node[03-05,9],gpu1`` -> ``node03``).

    The same host ``scontrol show hostnames | head -1`` prints; parsed here because compute
    nodes do not always have the slurm client tools on the PATH of the job's environment.
    """
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist)
    if not m or not (m.group(1) or m.group(2)):
        raise UserError(f"cannot read the slurm node list {nodelist!r}; set MASTER_ADDR to the first node's address")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(env: Mapping[str, str], key: str) -> Optional[int]:
    raw = env.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {key}={raw!r} is not an integer; unset it or fix the launcher") from None


def _port_of_job(job_id: Optional[int]) -> int:
    """Every task of a slurm job derives the same port; two jobs sharing a node rarely collide."""
    return DEFAULT_PORT if job_id is None else 20000 + job_id % 40000


def resolve(env: Mapping[str, str]) -> Optional[dict]:
    """The launcher variables to set for this process, or None for a single process without a
    launcher (a one-process world on a free local port).

    Order: a launcher's own variables win (torchrun, deepspeed); then ``srun`` (a job step:
    ``SLURM_STEP_NUM_TASKS`` / ``SLURM_PROCID``); then Open MPI's ``mpirun``.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        if not env.get("MASTER_ADDR"):
            raise UserError("RANK and WORLD_SIZE are set but MASTER_ADDR is not; set MASTER_ADDR (and MASTER_PORT) "
                            "to rank 0's address, or start the job with torchrun / deepspeed")
        return {key: env[key] for key in LAUNCHER_KEYS if key in env}
    step_tasks = _int(env, "SLURM_STEP_NUM_TASKS")
    if step_tasks is not None and step_tasks > 1:
        rank = _int(env, "SLURM_PROCID")
        if rank is None:
            raise UserError(f"srun started {step_tasks} tasks but SLURM_PROCID is not set; launch with srun "
                            "(or torchrun / deepspeed, which set RANK)")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        master = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
        if not master:
            raise UserError("srun tasks have no node list (SLURM_JOB_NODELIST) to find rank 0; set MASTER_ADDR")
        local = _int(env, "SLURM_LOCALID")
        return {"RANK": str(rank), "WORLD_SIZE": str(step_tasks), "LOCAL_RANK": str(local or 0),
                "MASTER_ADDR": master,
                "MASTER_PORT": env.get("MASTER_PORT") or str(_port_of_job(_int(env, "SLURM_JOB_ID")))}
    mpi_size = _int(env, "OMPI_COMM_WORLD_SIZE")
    if mpi_size is not None and mpi_size > 1:
        if not env.get("MASTER_ADDR"):
            raise UserError(f"mpirun started {mpi_size} processes but MASTER_ADDR is not set; export "
                            "MASTER_ADDR=<rank 0's host> (and MASTER_PORT) with mpirun -x")
        return {"RANK": str(_int(env, "OMPI_COMM_WORLD_RANK") or 0), "WORLD_SIZE": str(mpi_size),
                "LOCAL_RANK": str(_int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0),
                "MASTER_ADDR": env["MASTER_ADDR"], "MASTER_PORT": env.get("MASTER_PORT") or str(DEFAULT_PORT)}
    job_tasks = _int(env, "SLURM_NTASKS")
    if step_tasks is None and job_tasks is not None and job_tasks > 1 and "SLURM_JOB_ID" in env:
        # The batch script itself: one process in an allocation made for several.
        raise UserError(f"this slurm allocation has {job_tasks} tasks but the job was started without srun; "
                        "start it with `srun python ...` (or launchers/slurm/pretrain_prune.sbatch), or "
                        "request --ntasks=1 for a single process")
    return None
