"""Launch identity: the launcher's variables derived from slurm's or Open MPI's, and a one-line
refusal when several tasks exist but a process cannot tell which one it is."""
import os
import subprocess
import sys

import pytest

from megatron_effllm.errors import UserError
from megatron_effllm.parallel import launch_env
from tests.dist_utils import free_port

SRUN = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]"}


@pytest.mark.parametrize("nodelist, first", [
    ("node03", "node03"), ("node[03-05,9]", "node03"), ("node[9,3-5]", "node9"),
    ("gpu-a[12],gpu-b[1-2]", "gpu-a12"), ("a1,b2", "a1"), ("10.0.0.7", "10.0.0.7"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert launch_env.first_host(nodelist) == first


def test_launcher_variables_win_over_the_scheduler():
    env = dict(SRUN, RANK="3", WORLD_SIZE="8", LOCAL_RANK="3", MASTER_ADDR="head", MASTER_PORT="1234")
    assert launch_env.resolve(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                                       "MASTER_ADDR": "head", "MASTER_PORT": "1234"}


def test_srun_tasks_get_rank_world_local_rank_and_a_shared_rendezvous():
    got = launch_env.resolve(SRUN)
    assert got == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
                   "MASTER_PORT": str(20000 + 4242 % 40000)}
    # Every task of the job derives the same rendezvous.
    other = launch_env.resolve(dict(SRUN, SLURM_PROCID="0", SLURM_LOCALID="0"))
    assert (other["MASTER_ADDR"], other["MASTER_PORT"]) == (got["MASTER_ADDR"], got["MASTER_PORT"])


def test_open_mpi_ranks():
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "MASTER_ADDR": "head"}
    assert launch_env.resolve(env) == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0",
                                       "MASTER_ADDR": "head", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env", [{}, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"},
                                 dict(SRUN, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")],
                         ids=["no launcher", "one-task allocation", "srun -n 1"])
def test_a_single_process_without_a_launcher(env):
    assert launch_env.resolve(env) is None


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n1"},
     "this slurm allocation has 8 tasks but the job was started without srun"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_PROCID"}, "srun started 16 tasks but SLURM_PROCID is not set"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, "mpirun started 4 processes but MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK and WORLD_SIZE are set but MASTER_ADDR is not"),
    (dict(SRUN, SLURM_PROCID="x"), "SLURM_PROCID='x' is not an integer"),
    (dict(SRUN, SLURM_JOB_NODELIST="[", SLURM_STEP_NODELIST=""), "cannot read the slurm node list"),
], ids=["batch script of a multi-task job", "no task id", "mpirun without rendezvous", "no master",
        "garbled task id", "garbled node list"])
def test_refusals_are_one_line(env, expected):
    with pytest.raises(UserError) as err:
        launch_env.resolve(env)
    assert expected in str(err.value) and "\n" not in str(err.value)


_WORKER = """
import torch, torch.distributed as dist
from megatron_effllm.parallel import runtime
runtime._ensure_process_group(60)
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print("RESULT", dist.get_rank(), dist.get_world_size(), int(t.item()), flush=True)
dist.destroy_process_group()
"""


def test_two_srun_tasks_form_one_world():
    """Two processes that only have srun's variables (as `srun python ...` starts them) join one
    two-rank world instead of two one-rank worlds."""
    base = {k: v for k, v in os.environ.items()
            if k not in launch_env.LAUNCHER_KEYS and not k.startswith(("SLURM_", "OMPI_"))}
    procs = []
    for rank in range(2):
        env = dict(base, SLURM_JOB_ID="77", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=str(free_port()),
                   OMP_NUM_THREADS="1")
        procs.append(env)
    procs[1]["MASTER_PORT"] = procs[0]["MASTER_PORT"]  # the job's port: one per job
    running = [subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for env in procs]
    outs = [p.communicate(timeout=180) for p in running]
    lines = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert lines == ["RESULT 0 2 3", "RESULT 1 2 3"], [err[-2000:] for _, err in outs]
