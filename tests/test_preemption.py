"""Preemption: SIGTERM or SIGUSR1 on one rank stops every rank after the same step with a
checkpoint and exit code 0; restarted with resume: auto, the run ends bit-identical to an
uninterrupted one (inside a pruning window, with a prune event waiting, inside the L0 soft phase).
The ranks' checks are spaced in time, and SIGINT keeps its own meaning."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from dist_utils import free_port

from megatron_effllm.training import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
# 10 steps, pruning window 2-8 with events every 2 steps (after steps 4, 6, 8) and a compaction
# every 2 events; data weights updated every 3 steps; the only periodic checkpoint is the last.
# The ranks check for a signal after every step, so the test knows the step they stop at.
SHORT = ["train.steps=10", "train.log_interval=1", "train.checkpoint_interval=100", "prune.start_step=2",
         "prune.end_step=8", "prune.interval=2", "prune.compact_every=2", "data.dynamic_interval=3",
         "export.hf_dtype=fp32", "train.progress_bar=false", "train.preempt_check_s=0"]
# Steps 3 and 4 skipped as non-finite: the event after step 4 has no statistics and waits.
WAIT = "grad@3,loss@4"


def _launch(run_dir: str, extra: list, inject: str = "", signal_at: str = "", sig: str = "") -> list:
    """Two ranks of effllm-train (as a launcher starts them); [(exit code, output)] by rank."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", EFFLLM_INJECT_NONFINITE=inject, EFFLLM_KILL_AT=signal_at,
                   EFFLLM_KILL_SIGNAL=sig)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_effllm.cli.train", "--config", TINY, f"run_dir={run_dir}",
             "parallel.comm_timeout_s=120", *SHORT, *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = []
    try:
        for p in procs:
            out.append((p.wait(timeout=900), p.stdout.read()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _records(run_dir: str, kind: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _final(run_dir: str):
    from safetensors.torch import load_file

    with open(os.path.join(run_dir, "final", "architecture.json")) as f:
        arch = json.load(f)
    return arch, load_file(os.path.join(run_dir, "final", "hf", "model.safetensors"))


def _assert_preempted(res: list, run_dir: str, step: int, sig: str, rank: int) -> None:
    folder = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    line = (f"[preempt] preempted at step {step} (SIG{sig} on rank {rank}); checkpoint at {folder}; "
            "restart with resume: auto")
    for r, (code, out) in enumerate(res):
        assert code == 0, f"rank {r} exited {code}:\n{out[-3000:]}"
        assert line in out and "Traceback" not in out, out[-3000:]
        assert f"step {step + 1}/" not in out  # no rank went on
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        assert f.read().strip() == os.path.basename(folder)
    assert os.path.isfile(os.path.join(folder, "MANIFEST.json"))
    assert _records(run_dir, "preempted")[-1]["step"] == step


def _assert_identical(reference: str, resumed: str) -> None:
    arch_a, w_a = _final(reference)
    arch_b, w_b = _final(resumed)
    assert arch_a == arch_b
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), k
    losses = [{r["step"]: r["loss"] for r in _records(d, "train")} for d in (reference, resumed)]
    assert losses[0] == losses[1] and sorted(losses[0]) == list(range(1, 11))
    # The same prune events at the same steps, the waiting one included.
    prunes = [[(r["step"], r["params"]) for r in _records(d, "architecture")] for d in (reference, resumed)]
    assert prunes[0] == prunes[1]


def test_one_signalled_rank_stops_every_rank_and_the_run_resumes_exactly(tmp_path):
    """SIGUSR1 on rank 1 after step 4 (the prune event waiting for statistics), then SIGTERM on
    rank 0 after step 7 (mid-interval: step 7's statistics feed the event after step 8): both
    ranks stop at that step with a checkpoint and exit 0 each time; resumed twice, the run ends
    with the uninterrupted run's Architecture, weights and per-step losses, bit for bit."""
    reference = str(tmp_path / "reference")
    res = _launch(reference, [], inject=WAIT)
    assert [code for code, _ in res] == [0, 0], res[0][1][-3000:]
    assert [r["step"] for r in _records(reference, "architecture")][:2] == [5, 6]  # the wait

    run_dir = str(tmp_path / "preempted")
    _assert_preempted(_launch(run_dir, [], inject=WAIT, signal_at="step.end@4:1", sig="USR1"), run_dir, 4, "USR1", 1)
    state = torch.load(os.path.join(run_dir, "checkpoints", "step_000004", "trainer_state.pt"), weights_only=False)
    assert state["pruning"]["waiting"] is True
    res = _launch(run_dir, [], inject=WAIT, signal_at="step.end@7:0", sig="TERM")
    assert "[resume] continuing from" in res[0][1] and "at step 4" in res[0][1]
    _assert_preempted(res, run_dir, 7, "TERM", 0)
    res = _launch(run_dir, [], inject=WAIT)
    assert [code for code, _ in res] == [0, 0], res[0][1][-3000:]
    assert "at step 7" in res[0][1]
    _assert_identical(reference, run_dir)


def test_preempted_inside_the_l0_soft_phase_resumes_exactly(tmp_path):
    """Sheared-LLaMA's learned gates: SIGTERM on rank 1 after step 5 (soft phase, steps 2-8)."""
    extra = ["prune.strategy=sheared", "prune.obs=false"]
    reference = str(tmp_path / "reference")
    res = _launch(reference, extra)
    assert [code for code, _ in res] == [0, 0], res[0][1][-3000:]
    run_dir = str(tmp_path / "preempted")
    _assert_preempted(_launch(run_dir, extra, signal_at="step.end@5:1", sig="TERM"), run_dir, 5, "TERM", 1)
    state = torch.load(os.path.join(run_dir, "checkpoints", "step_000005", "trainer_state.pt"), weights_only=False)
    assert state["pruning"]["phase"] == "soft"
    res = _launch(run_dir, extra)
    assert [code for code, _ in res] == [0, 0], res[0][1][-3000:]
    _assert_identical(reference, run_dir)


# ------------------------------------------------------------------ one process, no training
def test_signals_only_set_a_flag_and_sigint_is_untouched():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with preemption.signals():
        assert preemption.received() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.received() == signal.SIGTERM  # still running: the last one is kept
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before
    with preemption.signals():
        assert preemption.received() == 0  # a new run starts unsignalled


class _Clock:
    """Fake time, and the last step the test ran."""

    def __init__(self, step: int):
        self.now = 0.0
        self.step = step

    def __call__(self):
        return self.now


def _checks(watch: preemption.Watch, clock: _Clock, seconds_per_step: list, signal_after: int = 0) -> tuple:
    """The steps at which ``watch`` compared flags, and the step it stopped at (or None); a
    signal arrives during step ``signal_after``."""
    checks = []
    for dt in seconds_per_step:
        clock.now += dt
        clock.step = step = clock.step + 1
        before = watch.next_check
        if step == signal_after:
            preemption._handler(signal.SIGUSR1, None)
        request = watch.requested(step)
        if step >= before:
            checks.append(step)
        if request is not None:
            assert request.signum == signal.SIGUSR1 and request.rank == 0
            return checks, step
    return checks, None


def test_checks_are_spaced_by_time_and_bound_the_delay():
    """With 2 s steps and preempt_check_s=30 the flags are compared every 15 steps; when steps
    slow to 6 s, every 5 (after one window that still spaced them by the faster steps); a signal
    waits at most 30 s plus the step in flight. preempt_check_s=0 checks after every step. The
    first check is the step after the start (a resumed run's first step too)."""
    with preemption.signals():
        clock = _Clock(100)
        watch = preemption.Watch(30.0, start_step=100, clock=clock)
        checks, stopped = _checks(watch, clock, [2.0] * 40)  # steps 101-140
        assert checks == [101, 116, 131] and stopped is None
        checks, stopped = _checks(watch, clock, [6.0] * 30)  # steps 141-170
        assert checks == [146, 154, 159, 164, 169] and stopped is None
        checks, stopped = _checks(watch, clock, [6.0] * 10, signal_after=171)
        assert checks == [174] and stopped == 174 and (174 - 171 + 1) * 6.0 <= 30.0 + 6.0
    with preemption.signals():
        clock = _Clock(0)
        watch = preemption.Watch(0.0, start_step=0, clock=clock)
        checks, stopped = _checks(watch, clock, [2.0] * 5)
        assert checks == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("sig", ["TERM", "USR1"])
def test_the_injected_signal_is_delivered(sig, monkeypatch):
    from megatron_effllm.training.fault_injection import kill_point

    monkeypatch.setenv("EFFLLM_KILL_AT", "step.end@3")
    monkeypatch.setenv("EFFLLM_KILL_SIGNAL", sig)
    with preemption.signals():
        kill_point("step.end", 2)
        assert preemption.received() == 0
        kill_point("step.end", 3)
        assert preemption.received() == getattr(signal, f"SIG{sig}")
