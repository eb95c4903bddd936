"""A checkpoint written at one (DP, TP, PP, ZeRO stage) layout resumes at another (real gloo
ranks through the trainer, the tiny config).

Each run is checkpointed at step 6, inside the pruning window: saliency sums accumulated, a
compaction done and groups masked since, OBS Hessians and the cached H^-1 mid-cycle. A resume
at the same layout is bit-identical to the uninterrupted run (test_training_tp, _pp,
test_preemption), so the uninterrupted run's losses are the same-layout resume's. Resumed at
another layout from the checkpoint's portable state, every later step's loss equals it to fp32
rounding (rtol 1e-5) and the final Architecture is identical, for DP=2 ZeRO-2 -> DP=1 ZeRO-1,
TP=2 -> TP=1, PP=2 -> PP=1 and DP=2 TP=1 -> DP=1 TP=2 (its TP=1 run holds the widths to TP=2's
divisibility, as TP=2 needs; the TP=1 run resumed from TP=2 too, or it could choose widths TP=2
cannot hold). Without the carried saliency sums the next prune
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
        "data.dynamic=false", "export.hf_dtype=fp32", "train.progress_bar=false",
        "train.portable_checkpoint=true"]
NO_OBS = ["prune.obs=false"]
CKPT = 6
RTOL = 1e-5

# name: (layout written, layout resumed at); each a list of overrides
CASES = {
    "dp": (["parallel.zero_stage=2"], ["parallel.zero_stage=1"]),
    "tp": (["parallel.tp=2"] + NO_OBS, NO_OBS),
    "pp": (["parallel.pp=2"], []),
    "tp_up": (NO_OBS, ["parallel.tp=2"] + NO_OBS),  # written at DP=2 TP=1, resumed at DP=1 TP=2
}


def comm_barrier():
    """Rank 0 copies a checkpoint before any rank starts from it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


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
    """Run ``plan``'s (run_dir, overrides, resumed from or None, without pruning statistics,
    widths held to TP=2's divisibility) one after the other; rank 0 returns each run's losses
    and final Architecture."""
    import dataclasses

    from megatron_effllm.training import checkpoint as ckpt
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.runtime.schedule import Schedule
    from megatron_effllm.training.trainer import run

    out = {}
    load_rank_states, constraints = ckpt.load_rank_states, Schedule.constraints
    for run_dir, extra, src, drop_statistics, tp2_widths in plan:
        if src is not None and rank == 0:
            _resume_dir(src, run_dir)
        comm_barrier()
        if drop_statistics:  # the control: everything carried but the pruning runtime's sums
            ckpt.load_rank_states = lambda *a: None
        if tp2_widths:  # a TP=1 run whose checkpoint must load at TP=2
            Schedule.constraints = lambda self: dataclasses.replace(constraints(self), tensor_parallel=2)
        try:
            run(load_config(TINY, BASE + [f"run_dir={run_dir}", "resume=auto"] + list(extra)))
        finally:
            ckpt.load_rank_states, Schedule.constraints = load_rank_states, constraints
        if rank == 0:
            out[run_dir] = _result(run_dir)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("layout"))

    def d(name):
        return os.path.join(base, name)

    two = [(d(f"{n}_src"), CASES[n][0], None, False, n == "tp_up") for n in ("tp_up", "dp", "tp", "pp")]
    two.insert(1, (d("tp_up"), CASES["tp_up"][1], d("tp_up_src"), False, False))
    out = run_ranks(_runs, world_size=2, args=(two,), timeout=2400)[0]
    one = [(d(n), CASES[n][1], d(f"{n}_src"), False, n == "tp") for n in ("dp", "tp", "pp")]
    one.append((d("dp_control"), CASES["dp"][1], d("dp_src"), True, False))
    out.update(run_ranks(_runs, world_size=1, args=(one,), timeout=1800)[0])
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


def test_another_layout_without_the_portable_state_is_refused_in_one_line(tmp_path):
    from megatron_effllm.errors import UserError
    from megatron_effllm.training import portable

    path = tmp_path / "layout.json"
    written = {"world_size": 2, "zero_stage": 2, "tp": 2, "pp": 1, "ranks": [[0, 0, 0], [1, 0, 0]]}
    now = {"world_size": 1, "zero_stage": 1, "tp": 1, "pp": 1}
    path.write_text(json.dumps(written))
    assert portable.other_layout(str(path), {k: written[k] for k in now}) is None  # the same: the exact path
    with pytest.raises(UserError) as err:
        portable.other_layout(str(path), now)
    msg = str(err.value)
    assert "\n" not in msg and "2 processes, ZeRO-2, TP=2, PP=1" in msg and "1 processes, ZeRO-1, TP=1, PP=1" in msg
    assert "set train.portable_checkpoint=true there" in msg
    (tmp_path / "portable").mkdir()
    (tmp_path / "portable" / "index.json").write_text("{}")
    assert portable.other_layout(str(path), now) == written


def test_hessian_blocks_move_between_tp_sizes():
    import torch

    from megatron_effllm.layout.dims import ParallelDims
    from megatron_effllm.training.runtime import relayout

    name = "model.layers.0.mlp.down_proj.weight"
    g = torch.Generator().manual_seed(0)
    blocks = {(t, d): torch.randn(3, 3, generator=g) for t in range(2) for d in range(2)}
    old = [(ParallelDims(t, 2, 0, 1, d, 2), {"hessians": {f"xtx.{name}": blocks[t, d], f"n.{name}": torch.tensor(5.0)}},
            None) for t in range(2) for d in range(2)]
    one = relayout.hessians(old, ParallelDims(), num_layers=1)
    want = torch.block_diag(blocks[0, 0] + blocks[0, 1], blocks[1, 0] + blocks[1, 1])
    assert torch.equal(one[f"xtx.{name}"], want) and float(one[f"n.{name}"]) == 10.0
    # back to TP=2 (DP=1): each rank its own block again; the second DP rank of a DP=2 layout holds zeros
    back = [(ParallelDims(), {"hessians": one}, None)]
    for t in range(2):
        mine = relayout.hessians(back, ParallelDims(t, 2), num_layers=1)
        assert torch.equal(mine[f"xtx.{name}"], want[3 * t:3 * t + 3, 3 * t:3 * t + 3])
    other = relayout.hessians(back, ParallelDims(0, 1, 0, 1, 1, 2), num_layers=1)
    assert not other[f"xtx.{name}"].any() and float(other[f"n.{name}"]) == 0.0
