"""The launch scripts, run for real with stub executables (srun, scontrol, deepspeed, torchrun,
nvidia-smi, python, pip) that record their arguments and environment: the exact command lines
for 1 node x 8 GPUs, 4 nodes from a deepspeed hostfile and slurm 2 x 8, the environment check
inside a job, slurm's time-limit signal and the requeue; and shellcheck on every shell script.

Each test runs the scripts from a copy of launchers/ and tools/ensure_env.sh in a temporary
repository whose .venv/bin holds the stubs (ensure_env.sh puts .venv/bin first on PATH), with a
minimal environment, so nothing from the machine running the tests leaks in.

shellcheck: skipped when it is not installed, unless EFFLLM_REQUIRE_SHELLCHECK=1 (set by .ci/run,
which installs it) turns its absence into a failure.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import time

import pytest

from megatron_effllm.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["-m", "megatron_effllm.cli.train"]

# Records "$@" (NUL-separated), the environment and the ignored-signal mask, then acts per STUB_*.
STUB = r"""#!/usr/bin/env bash
name="$(basename "$0")"
log="$STUB_LOG/$name.$(date +%s%N).$$"
printf '%s\0' "$@" > "$log.argv"
env -0 > "$log.env"
grep '^SigIgn:' /proc/$$/status | cut -f2 > "$log.sigign"
case "$name" in
  scontrol)
    if [ "$1 $2" = "show hostnames" ]; then tr ' ' '\n' <<< "$STUB_HOSTS"; fi ;;
  nvidia-smi)
    for ((i = 0; i < ${STUB_GPUS:-0}; i++)); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done ;;
  srun)
    if [ "${STUB_SRUN:-run}" = wait ]; then
      # A job step that runs until slurm's signal: exits with STUB_SRUN_RC once USR1 arrives.
      trap 'echo USR1 > "$log.signal"; exit "${STUB_SRUN_RC:-0}"' USR1
      touch "$STUB_LOG/step-started"
      while :; do sleep 0.05; done
    fi
    while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
    exec "$@" ;;
esac
"""
STUBS = ("srun", "scontrol", "deepspeed", "torchrun", "nvidia-smi", "python", "pip")


@pytest.fixture
def repo(tmp_path):
    """A repository copy with the launch scripts, a set-up .venv of stubs and a config."""
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "launchers"), repo / "launchers")
    (repo / "tools").mkdir()
    shutil.copy(os.path.join(ROOT, "tools", "ensure_env.sh"), repo / "tools")
    for name in ("requirements.txt", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), repo)
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in STUBS:
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    for stamp, source in ((".requirements.sha256", "requirements.txt"), (".pyproject.sha256", "pyproject.toml")):
        digest = hashlib.sha256((repo / source).read_bytes()).hexdigest()
        (repo / ".venv" / stamp).write_text(digest + "\n")
    (repo / "configs").mkdir()
    (repo / "configs" / "run.yaml").write_text("run_dir: runs/x\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "log").mkdir()
    return repo


def _env(repo, **extra):
    tmp = repo.parent
    env = {"PATH": f"{repo}/.venv/bin:/usr/bin:/bin", "HOME": str(tmp / "home"), "TMPDIR": str(tmp),
           "STUB_LOG": str(tmp / "log"), "LANG": "C.UTF-8"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(repo, script, *args, **env):
    return subprocess.run(["bash", os.path.join(repo, script), *args], cwd=repo, env=_env(repo, **env),
                          capture_output=True, text=True, timeout=60, check=False)


def _calls(repo, name):
    """[(argv, env, ignored signal mask)] of every call of stub ``name``, in order."""
    log = repo.parent / "log"
    out = []
    for f in sorted(log.glob(f"{name}.*.argv")):
        stem = str(f)[:-len(".argv")]
        argv = [a.decode() for a in f.read_bytes().split(b"\0")[:-1]]
        with open(stem + ".env", "rb") as e:
            env = dict(item.split("=", 1) for item in e.read().decode().split("\0") if "=" in item)
        with open(stem + ".sigign") as s:
            ignored = int(s.read().strip(), 16)
        out.append((argv, env, ignored))
    return out


def _one(repo, name):
    calls = _calls(repo, name)
    assert len(calls) == 1, f"{name} was called {len(calls)} times"
    return calls[0]


def test_one_node_eight_gpus_runs_deepspeed_with_eight_processes(repo):
    res = _launch(repo, "launchers/pretrain_prune.sh", "configs/run.yaml", "run_dir=runs/a", STUB_GPUS=8)
    assert res.returncode == 0, res.stderr
    argv, env, _ = _one(repo, "deepspeed")
    assert argv == ["--num_nodes", "1", "--master_port", "29500", "--num_gpus", "8",
                    "--module", "megatron_effllm.cli.train", "--config", "configs/run.yaml", "run_dir=runs/a"]
    assert "OMP_NUM_THREADS" not in env and "DS_ENV_FILE" not in env
    assert env["PYTHONPATH"].split(":")[0] == str(repo)
    assert _calls(repo, "pip") == []


def test_cpu_ranks_share_the_cores(repo):
    res = _launch(repo, "launchers/pretrain_prune.sh", "configs/run.yaml", NPROC_PER_NODE=2)
    assert res.returncode == 0, res.stderr
    argv, env, _ = _one(repo, "deepspeed")
    assert argv[:6] == ["--num_nodes", "1", "--master_port", "29500", "--num_gpus", "2"]
    assert env["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 2))


def test_four_nodes_from_a_login_node_use_the_hostfile_and_forward_the_environment(repo):
    """No GPU on the launching node: the hostfile's slots decide, and the job's variables reach
    the other nodes through the deepspeed environment file."""
    hosts = repo / "hosts"
    hosts.write_text("# four nodes\n" + "".join(f"gpu0{i} slots=8\n" for i in range(4)) + "\n")
    (repo.parent / "home" / ".deepspeed_env").write_text("UCX_TLS=rc\n\n")
    forwarded = {"EFFLLM_COMM_TIMEOUT_S": "900", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                 "NCCL_SOCKET_IFNAME": "^lo,docker0", "NCCL_IB_HCA": "mlx5_0,mlx5_1",
                 "GLOO_SOCKET_IFNAME": "ib0", "OMP_NUM_THREADS": "8", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    res = _launch(repo, "launchers/pretrain_prune.sh", "configs/run.yaml", "parallel.tp=8",
                  HOSTFILE="hosts", MASTER_ADDR="gpu00", UNRELATED="x", **forwarded)
    assert res.returncode == 0, res.stderr
    argv, env, _ = _one(repo, "deepspeed")
    assert argv == ["--num_nodes", "4", "--master_port", "29500", "--hostfile", "hosts", "--master_addr", "gpu00",
                    "--module", "megatron_effllm.cli.train", "--config", "configs/run.yaml", "parallel.tp=8"]
    # DeepSpeed 0.19.8 reads os.path.join(dir, DS_ENV_FILE) for dir in (~, .): an absolute path as is,
    # one "KEY=VALUE" per line (a line without "=" stops its runner).
    path = env["DS_ENV_FILE"]
    assert os.path.isabs(path)
    with open(path) as f:
        lines = f.read().splitlines()
    assert all("=" in line for line in lines)
    written = dict(line.split("=", 1) for line in lines)
    assert written == {"UCX_TLS": "rc", **forwarded}
    assert _calls(repo, "pip") == []


def test_explicit_processes_per_node_with_a_hostfile(repo):
    (repo / "hosts").write_text("a slots=8\nb slots=8\n")
    res = _launch(repo, "launchers/pretrain_prune.sh", "configs/run.yaml", HOSTFILE="hosts", NPROC_PER_NODE=4)
    assert res.returncode == 0, res.stderr
    argv, _, _ = _one(repo, "deepspeed")
    assert argv[:8] == ["--num_nodes", "2", "--master_port", "29500", "--num_gpus", "4", "--hostfile", "hosts"]


def _sbatch_env(repo, **extra):
    return dict(SLURM_JOB_ID=4242, SLURM_JOB_NAME="effllm", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NNODES=2,
                SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_PER_TASK=64, SLURM_SUBMIT_DIR=repo,
                STUB_HOSTS="gpu01 gpu02", NCCL_SOCKET_IFNAME="ib0", GLOO_SOCKET_IFNAME="ib0", **extra)


def test_slurm_two_by_eight_runs_torchrun_under_srun_and_overrides_win(repo):
    res = _launch(repo, "launchers/slurm/pretrain_prune.sbatch", "configs/run.yaml", "resume=none",
                  "train.progress_bar=false", **_sbatch_env(repo))
    assert res.returncode == 0, res.stderr
    overrides = ["resume=auto", "resume=none", "train.progress_bar=false"]
    argv, env, _ = _one(repo, "srun")
    assert argv == ["--export=ALL", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=64",
                    "bash", "launchers/pretrain_prune.sh", "configs/run.yaml", *overrides]
    argv, env, ignored = _one(repo, "torchrun")
    assert argv == ["--nnodes", "2", "--nproc_per_node", "8", "--rdzv_id", "4242", "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", "gpu01:29500", *TRAIN, "--config", "configs/run.yaml", *overrides]
    assert env["MASTER_ADDR"] == "gpu01" and env["GLOO_SOCKET_IFNAME"] == "ib0" and env["NCCL_SOCKET_IFNAME"] == "ib0"
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "240"
    # torchrun ignores USR1 (the ranks, which slurm signals too, handle it), and does not die of it.
    assert ignored & (1 << (signal.SIGUSR1 - 1))
    assert _calls(repo, "scontrol")[0][0] == ["show", "hostnames", "gpu[01-02]"]
    assert len(_calls(repo, "scontrol")) == 1  # no requeue without the signal
    assert _calls(repo, "pip") == []
    assert "NCCL_SOCKET_IFNAME=ib0" in res.stdout
    # The training config takes the last value of a repeated key.
    assert load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), overrides).resume == "none"


@pytest.mark.parametrize("gpus, nproc", [("8", "8"), ("a100:2,v100:2", "4"), ("h100:x", None)])
def test_slurm_gpu_counts(repo, gpus, nproc):
    res = _launch(repo, "launchers/pretrain_prune.sh", "configs/run.yaml", EFFLLM_LAUNCHER="torchrun",
                  SLURM_JOB_ID=1, SLURM_GPUS_PER_NODE=gpus)
    if nproc is None:
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [
            "error: SLURM_GPUS_PER_NODE=x is not a positive number of processes or GPUs; fix or unset it"]
        assert _calls(repo, "torchrun") == []
    else:
        assert res.returncode == 0, res.stderr
        assert _one(repo, "torchrun")[0][2:4] == ["--nproc_per_node", nproc]


def test_a_job_checks_the_environment_and_never_installs(repo):
    """Inside slurm a stale environment stops the job in one line; pip is never run there.
    Outside a job the same script sets the environment up as before."""
    (repo / ".venv" / ".requirements.sha256").write_text("stale\n")
    res = _launch(repo, "launchers/slurm/pretrain_prune.sbatch", "configs/run.yaml", **_sbatch_env(repo))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [(
        f"error: the environment in {repo}/.venv was not installed from this requirements.txt; run "
        f"`bash {repo}/tools/ensure_env.sh` once where pip can reach the package registry (e.g. the login node), "
        "then launch again")]
    assert _calls(repo, "pip") == [] and _calls(repo, "srun") == []
    res = _launch(repo, "launchers/pretrain_prune.sh", "configs/run.yaml", SLURM_JOB_ID=7, SLURM_GPUS_ON_NODE=8)
    assert res.returncode == 2 and "was not installed from this requirements.txt" in res.stderr
    assert _calls(repo, "pip") == [] and _calls(repo, "deepspeed") == []
    res = _launch(repo, "launchers/pretrain_prune.sh", "configs/run.yaml", STUB_GPUS=1)
    assert res.returncode == 0, res.stderr
    (pip_argv, _, _), = _calls(repo, "pip")
    assert pip_argv[-2:] == ["-r", f"{repo}/requirements.txt"]
    assert len(_calls(repo, "deepspeed")) == 1


@pytest.mark.parametrize("step_rc, requeued", [(0, True), (1, False)])
def test_time_limit_signal_reaches_the_step_and_a_clean_stop_requeues(repo, step_rc, requeued):
    env = _env(repo, **_sbatch_env(repo, STUB_SRUN="wait", STUB_SRUN_RC=step_rc))
    proc = subprocess.Popen(["bash", str(repo / "launchers/slurm/pretrain_prune.sbatch"), "configs/run.yaml"],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = repo.parent / "log" / "step-started"
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists(), "the job step did not start"
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 delivers to the batch shell
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == step_rc, err
    (srun_argv, _, _), = _calls(repo, "srun")
    assert srun_argv[-2:] == ["configs/run.yaml", "resume=auto"]
    assert list((repo.parent / "log").glob("srun.*.signal")), "USR1 was not forwarded to the job step"
    scontrol = [argv for argv, _, _ in _calls(repo, "scontrol")]
    assert scontrol[1:] == ([["requeue", "4242"]] if requeued else [])


def test_dry_run_hands_the_cluster_shape_to_the_plan(repo):
    args = ["nodes=128", "gpus_per_node=8", "gpu_mem_gb=80", "parallel.tp=2"]
    res = _launch(repo, "launchers/pretrain_prune.sh", "configs/run.yaml", "--dry-run", *args)
    assert res.returncode == 0, res.stderr
    argv, _, _ = _one(repo, "python")
    assert argv == ["-m", "megatron_effllm.cli.plan", "configs/run.yaml", *args]
    assert _calls(repo, "deepspeed") == [] and _calls(repo, "torchrun") == []


def _shell_scripts():
    """Every tracked *.sh / *.sbatch, and every tracked file without an extension whose first line
    is a bash or sh shebang (.ci/run)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    scripts = []
    for name in files:
        path = os.path.join(ROOT, name)
        if name.endswith((".sh", ".sbatch")):
            scripts.append(name)
        elif "." not in os.path.basename(name) and os.path.isfile(path):
            with open(path, "rb") as f:
                first = f.readline()
            if first.startswith(b"#!") and first.split(b"/")[-1].split()[-1] in (b"bash", b"sh"):
                scripts.append(name)
    return scripts


def test_shellcheck_passes_on_every_shell_script():
    scripts = _shell_scripts()
    assert {"launchers/pretrain_prune.sh", "launchers/slurm/pretrain_prune.sbatch", "tools/ensure_env.sh",
            ".ci/run"} <= set(scripts)
    if shutil.which("shellcheck") is None:
        if os.environ.get("EFFLLM_REQUIRE_SHELLCHECK") == "1":
            pytest.fail("shellcheck is not installed; install the Debian package: apt-get install shellcheck")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); CI requires it")
    res = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


# The dry run prints the launch command lines; run them and the real scripts with the stubs, the
# same layouts, and compare what each executes. Only the environment a cluster would give is
# supplied (the hostfile, slurm's variables for the sbatch line's options); bash expands the
# variables the printed lines keep as variables.
PLAN_CONFIG = "configs/tiny_cpu.yaml"
PLAN_OVERRIDES = ["data.global_batch=256", "run_dir=runs/my run"]  # a space: the quoting is pinned too


def _plan_launch(nodes, gpus_per_node):
    from megatron_effllm.planning import make_plan

    return make_plan(PLAN_CONFIG, nodes, gpus_per_node, 80, PLAN_OVERRIDES).launch


def _plan_repo(repo):
    (repo / "configs" / "tiny_cpu.yaml").write_text(open(os.path.join(ROOT, PLAN_CONFIG)).read())
    return repo


def _run_line(repo, line, **env):
    """``line`` as a user pastes it into bash at the repository root; [(argv, env, ignored)] per stub."""
    log = repo.parent / "log"
    for f in log.iterdir():
        f.unlink()
    res = subprocess.run(["bash", "-c", line], cwd=repo, env=_env(repo, **env), capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return {name: [argv for argv, _, _ in _calls(repo, name)] for name in ("deepspeed", "torchrun", "srun")}


@pytest.mark.parametrize("nodes, env", [
    (1, {"STUB_GPUS": 8}),
    (4, {"HOSTFILE": "hosts", "MASTER_ADDR": "gpu00"}),
    (4, {"HOSTFILE": "hosts"}),
])
def test_the_plans_deepspeed_lines_are_what_the_launcher_runs(repo, nodes, env):
    _plan_repo(repo)
    (repo / "hosts").write_text("".join(f"gpu0{i} slots=8\n" for i in range(4)))
    launch = _plan_launch(nodes, 8)
    launched = _run_line(repo, launch["launcher"], **env)
    printed = _run_line(repo, launch["deepspeed"], **env)
    assert printed["deepspeed"] == launched["deepspeed"] and len(launched["deepspeed"]) == 1
    assert launched["deepspeed"][0][-4:] == ["--config", PLAN_CONFIG, *PLAN_OVERRIDES]
    if nodes == 1:  # a node with 8 GPUs: the launcher alone finds the same command
        plain = _run_line(repo, f"launchers/pretrain_prune.sh {PLAN_CONFIG} 'data.global_batch=256' 'run_dir=runs/my run'",
                          **env)
        assert plain["deepspeed"] == printed["deepspeed"]


def test_the_plans_slurm_lines_are_what_the_sbatch_script_runs(repo):
    """The sbatch line's options become the job's slurm variables; the printed srun line runs in
    that job's batch shell, the printed torchrun line in its job step (MASTER_ADDR from the job)."""
    _plan_repo(repo)
    launch = _plan_launch(2, 8)
    sbatch = launch["sbatch"].split()
    assert sbatch[:5] == ["sbatch", "--nodes", "2", "--gpus-per-node", "8"]
    job = {**_sbatch_env(repo), "SLURM_NNODES": sbatch[2], "SLURM_GPUS_PER_NODE": f"h100:{sbatch[4]}"}
    job_line = launch["sbatch"].replace("sbatch --nodes 2 --gpus-per-node 8 ", "bash ", 1)
    launched = _run_line(repo, job_line, **job)
    assert len(launched["srun"]) == 1 and len(launched["torchrun"]) == 1
    assert _run_line(repo, launch["srun"], **job)["srun"] == launched["srun"]
    assert _run_line(repo, launch["torchrun"], MASTER_ADDR="gpu01", **job)["torchrun"] == launched["torchrun"]
    assert launched["torchrun"][0][-5:] == ["--config", PLAN_CONFIG, "resume=auto", *PLAN_OVERRIDES]
