"""A checkpoint written at one (DP, TP, PP, ZeRO stage) layout resumes at another (real gloo
ranks through the trainer, the tiny config).

Each run is checkpointed at step 6, inside the pruning window: saliency sums accumulated, a
compaction done and groups masked since, OBS Hessians and the cached H^-1 mid-cycle. A resume
at the same layout is bit-identical to the uninterrupted run (test_training_tp, _pp,
test_preemption), so the uninterrupted run's losses are the same-layout resume's. Resumed at
another layout from the checkpoint's portable state, every later step's loss equals it to fp32
rounding (rtol 1e-5) and the final Architecture is identical, for DP=2 ZeRO-2 -> DP=1 ZeRO-1,
TP=2 -> TP=1, PP=2 -> PP=1 and TP=1 -> TP=2. Without the carried saliency sums the next prune
events choose otherwise (the control). OBS is off in the TP cases: its Hessians are
block-diagonal over TP, so its updates legitimately depend on the TP size.
"""
import json
import os
import shutil

import pytest

from dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
BASE = ["train.steps=14", "train.checkpoint_interval=6", "train.keep_checkpoints=5", "train.log_interval=1",
        "train.eval_interval=100", "prune.start_step=2", "prune.end_step=12", "prune.compact_every=3",
        "data.dynamic=false", "export.hf_dtype=fp32", "train.progress_bar=false"]
NO_OBS = ["prune.obs=false"]
CKPT = 6
RTOL = 1e-5

# name: (layout written, layout resumed at); each a list of overrides
CASES = {
    "dp": (["parallel.zero_stage=2"], ["parallel.zero_stage=1"]),
    "tp": (["parallel.tp=2"] + NO_OBS, NO_OBS),
    "pp": (["parallel.pp=2"], []),
    "tp_up": (NO_OBS, ["parallel.tp=2"] + NO_OBS),
}


def _result(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "final", "architecture.json")) as f:
        arch = json.load(f)
    return {"losses": {r["step"]: r["loss"] for r in records if r["kind"] == "train"}, "arch": arch}


def _resume_dir(src, dst):
    """A new run folder holding only ``src``'s step-CKPT checkpoint (and its data cache)."""
    name = f"step_{CKPT:06d}"
    os.makedirs(os.path.join(dst, "checkpoints"))
    shutil.copytree(os.path.join(src, "checkpoints", name), os.path.join(dst, "checkpoints", name))
    shutil.copytree(os.path.join(src, "data"), os.path.join(dst, "data"))


def _runs(rank, world_size, plan):
    """Run ``plan``'s (run_dir, overrides, resumed from or None, without pruning statistics)
    one after the other; rank 0 returns each run's losses and final Architecture."""
    from megatron_effllm.training import checkpoint as ckpt
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    out = {}
    load_rank_states = ckpt.load_rank_states
    for run_dir, extra, src, drop_statistics in plan:
        if src is not None and rank == 0:
            _resume_dir(src, run_dir)
        if drop_statistics:  # the control: everything carried but the pruning runtime's sums
            ckpt.load_rank_states = lambda *a: None
        try:
            run(load_config(TINY, BASE + [f"run_dir={run_dir}", "resume=auto"] + list(extra)))
        finally:
            ckpt.load_rank_states = load_rank_states
        if rank == 0:
            out[run_dir] = _result(run_dir)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("layout"))

    def d(name):
        return os.path.join(base, name)

    single_first = [(d("tp_up_src"), CASES["tp_up"][0], None, False)]
    out = run_ranks(_runs, world_size=1, args=(single_first,))[0]
    two = [(d(f"{n}_src"), CASES[n][0], None, False) for n in ("dp", "tp", "pp")]
    two.append((d("tp_up"), CASES["tp_up"][1], d("tp_up_src"), False))
    out.update(run_ranks(_runs, world_size=2, args=(two,))[0])
    one = [(d(n), CASES[n][1], d(f"{n}_src"), False) for n in ("dp", "tp", "pp")]
    one.append((d("dp_control"), CASES["dp"][1], d("dp_src"), True))
    out.update(run_ranks(_runs, world_size=1, args=(one,))[0])
    return {os.path.basename(k): v for k, v in out.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_at_another_layout_continues_like_the_same_layout(runs, case):
    ref, resumed = runs[f"{case}_src"], runs[case]
    later = sorted(s for s in ref["losses"] if s > CKPT)
    assert later and sorted(resumed["losses"]) == later  # the resumed run logs only the steps after it
    for s in later:
        a, b = ref["losses"][s], resumed["losses"][s]
        assert abs(a - b) <= RTOL * abs(a), (case, s, a, b)
    assert resumed["arch"] == ref["arch"]
    assert ref["arch"]["hidden_size"] < 64  # pruned: the prune events after the resume mattered


def test_without_the_carried_statistics_the_resume_differs(runs):
    ref, control = runs["dp_src"], runs["dp_control"]
    later = sorted(s for s in ref["losses"] if s > CKPT)
    differs = any(abs(ref["losses"][s] - control["losses"][s]) > RTOL * abs(ref["losses"][s]) for s in later)
    assert differs or control["arch"] != ref["arch"]
