"""How a training run ends when its steps or its result are not finite, when it is interrupted,
and when it trains on a single domain: one clear line and the right exit code, never a
misleading message, a traceback or a broken model exported as if it were fine."""
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
# Pruning from step 2 (events after steps 3, 4, ...), static blend, nothing exported.
SHORT = ["train.steps=6", "train.log_interval=1", "train.checkpoint_interval=2", "prune.start_step=2",
         "prune.end_step=5", "prune.interval=1", "prune.compact_every=2", "data.dynamic=false",
         "export.hf=false"]
STREAK = "non-finite loss or gradients in 3 steps in a row (3-5) (train.max_nonfinite=3); lower optim.lr"


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _runs(rank, world_size, base, cases):
    """Several short runs in one process (imports once) sharing the tokenized builtin data:
    {name: {"summary" | "error": ..., "log": [lines]}}."""
    from megatron_effllm.errors import UserError
    from megatron_effllm.log import ROOT as LOGGER
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    out, first = {}, None
    for name, extra, inject in cases:
        run_dir = os.path.join(base, name)
        if first is not None:
            shutil.copytree(os.path.join(first, "data"), os.path.join(run_dir, "data"))
        first = first or run_dir
        os.environ["EFFLLM_INJECT_NONFINITE"] = inject
        lines = _Lines()
        logging.getLogger(LOGGER).addHandler(lines)
        try:
            out[name] = {"summary": run(load_config(TINY, SHORT + [f"run_dir={run_dir}"] + extra))}
        except UserError as err:
            out[name] = {"error": str(err), "type": type(err).__name__}
        finally:
            del os.environ["EFFLLM_INJECT_NONFINITE"]
            logging.getLogger(LOGGER).removeHandler(lines)
        out[name]["log"] = lines.lines
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("runs"))
    cases = [
        # The first step of the pruning window skipped, and the second (the event waits twice).
        ("window_start_skipped", [], "loss@3,grad@4"),
        # The same with events every 2 steps: the waiting one runs after step 5, off the schedule.
        ("window_start_skipped_every_2", ["prune.interval=2", "prune.end_step=6"], "grad@3,loss@4"),
        # Every step from the window's start non-finite (what optim.weight_decay=nan does).
        ("every_step_nonfinite", [], "grad@3,loss@4,grad@5"),
        # A valid config whose every update blows up.
        ("huge_lr", ["optim.lr=1e30"], ""),
        # Sheared-LLaMA's gates: the same faults.
        ("l0_window_start_skipped", ["prune.strategy=sheared", "prune.obs=false"], "loss@3"),
        # (Each injection fires once per process: another spelling for the second run.)
        ("l0_every_step_nonfinite", ["prune.strategy=sheared", "prune.obs=false"], "loss@3,grad@4,loss@5"),
        # A finite last step whose update broke the model.
        ("broken_final_model", ["export.hf=true"], "weights@6"),
    ]
    (out,) = run_ranks(_runs, world_size=1, args=(base, cases), timeout=900)
    return base, out


def test_prune_event_without_statistics_waits(runs):
    base, out = runs
    res = out["window_start_skipped"]
    assert "error" not in res, res.get("error")
    prunes = [r for r in _metrics(os.path.join(base, "window_start_skipped")) if r["kind"] == "architecture"
              and r.get("step", 0) < 6]
    assert prunes[0]["step"] == 5  # steps 3 and 4 were skipped: the event waited for step 5's statistics
    assert res["summary"]["final_params"] <= round(0.6 * res["summary"]["source_params"])
    waits = [l for l in res["log"] if "no saliency statistics yet" in l]
    assert len(waits) == 1 and "waits for the next step" in waits[0], res["log"]
    assert any("the waiting prune event runs" in l for l in res["log"])


def _resume(rank, world_size, run_dir, extra):
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    return run(load_config(TINY, SHORT + [f"run_dir={run_dir}"] + extra))


def test_waiting_prune_event_resumes(runs, tmp_path):
    """Events after steps 4 and 6; step 4's waits and runs after step 5. The step-4 checkpoint
    holds the waiting event: resumed from it, the run prunes at step 5 too and ends exactly as
    the uninterrupted one."""
    base, out = runs
    name, extra = "window_start_skipped_every_2", ["prune.interval=2", "prune.end_step=6"]
    full = os.path.join(base, name)
    assert [r["step"] for r in _metrics(full) if r["kind"] == "architecture"][:2] == [5, 6]
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(full, "checkpoints", "step_000004"),
                    os.path.join(resumed, "checkpoints", "step_000004"))
    shutil.copytree(os.path.join(full, "data"), os.path.join(resumed, "data"))
    (summary,) = run_ranks(_resume, world_size=1, args=(resumed, extra), timeout=600)
    assert [r["step"] for r in _metrics(resumed) if r["kind"] == "architecture"][:2] == [5, 6]
    want = out[name]["summary"]
    assert summary["widths"] == want["widths"] and summary["final_loss"] == want["final_loss"]


@pytest.mark.parametrize("name", ["every_step_nonfinite", "huge_lr", "l0_every_step_nonfinite"])
def test_nonfinite_steps_end_with_the_streak_line(runs, name):
    res = runs[1][name]
    assert res.get("type") == "NonFiniteError", res
    assert "\n" not in res["error"] and "no gradients accumulated" not in res["error"]
    if name == "huge_lr":  # the first update is finite (and ruins the weights)
        assert "non-finite loss or gradients in 3 steps in a row (2-4)" in res["error"], res["error"]
    else:
        assert res["error"].startswith(STREAK), res["error"]


def test_l0_gates_skip_a_nonfinite_step_and_say_so(runs):
    res = runs[1]["l0_window_start_skipped"]
    assert "error" not in res, res.get("error")
    assert any("step 3: no L0 gate update (the step was skipped as non-finite)" in l for l in res["log"])


def test_non_finite_final_model_is_not_exported(runs):
    base, out = runs
    res = out["broken_final_model"]
    run_dir = os.path.join(base, "broken_final_model")
    assert res.get("type") == "NonFiniteError", res
    msg = res["error"]
    assert "\n" not in msg and msg.startswith("the trained model is not finite (NaN/inf in 1 weight tensor")
    assert "held-out loss nan on books" in msg
    assert f"nothing was exported to {os.path.join(run_dir, 'final')}" in msg
    assert "step_000004, step_000006 in" in msg and "resume from an earlier one" in msg
    assert not os.path.exists(os.path.join(run_dir, "final", "hf"))
    assert not os.path.exists(os.path.join(run_dir, "final", "summary.json"))


def _one_domain(rank, world_size, run_dir):
    from megatron_effllm.assets import corpus_files
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    train, held = corpus_files("train")["code"], corpus_files("heldout")["code"]
    extra = [f"data.train={{code: {train}}}", f"data.heldout={{code: {held}}}", "train.steps=2",
             "prune.strategy=none", f"run_dir={run_dir}"]
    return run(load_config(TINY, SHORT + extra))


def test_single_domain_static_blend_trains(tmp_path):
    """data.dynamic=false (the default) with one domain: a one-prefix blend, trained end to end."""
    (summary,) = run_ranks(_one_domain, world_size=1, args=(str(tmp_path / "one"),), timeout=600)
    assert list(summary["heldout_ppl_final"]) == ["code"]
    losses = [r["loss"] for r in _metrics(str(tmp_path / "one")) if r["kind"] == "train"]
    assert len(losses) == 2


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "EFFLLM_KILL_AT",
                "EFFLLM_INJECT_NONFINITE"):
        env.pop(key, None)
    return env


def test_ctrl_c_says_how_to_resume(tmp_path):
    """SIGINT in the middle of training: exit code 130, no traceback, one line naming the newest
    checkpoint and the command that continues from it; that command does continue."""
    run_dir = str(tmp_path / "int")
    argv = ["--config", TINY, f"run_dir={run_dir}", "train.steps=500", "train.checkpoint_interval=2",
            "prune.strategy=none", "export.hf=false", "data.dynamic=false"]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_effllm.cli.train", *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not os.path.isdir(os.path.join(run_dir, "checkpoints", "step_000002")):
            assert proc.poll() is None and time.time() < deadline, "the run did not reach step 2"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted; the last checkpoint is {run_dir}/checkpoints/step_0000"), last
    folder = last.split("the last checkpoint is ", 1)[1].split(" ", 1)[0]
    step = int(folder.rsplit("_", 1)[1])
    command = shlex.split(last.split("continue with: ", 1)[1])
    assert command[:3] == ["effllm-train", "--config", TINY] and command[-1] == f"resume={folder}"
    # The printed command, with fewer steps, continues from that checkpoint.
    res = subprocess.run([sys.executable, "-m", "megatron_effllm.cli.train", *command[1:],
                          f"train.steps={step + 1}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"[resume] continuing from {folder} at step {step}" in res.stdout + res.stderr
