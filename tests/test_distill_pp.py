"""Online distillation under pipeline parallelism PP=2 (2 real gloo ranks, ZeRO-2), against the
same run in one process at PP=1 (distill.alpha=0.5, T=2, the teacher the tiny run's source):

- the teacher is built in stages beside the student's (stage k holds the teacher's layers of
  stage k), frozen, and outside the engine: the optimizer's groups hold exactly the student's
  parameters;
- the run prunes to exactly the PP=1 Architecture, and every logged loss (each half KD, half LM)
  equals PP=1's to fp32 rounding;
- resumed from its mid-prune checkpoint, the run ends bit-identical.
"""
import json
import os

import pytest
import torch

from dist_utils import run_ranks
from test_training_tp import _final_weights, _resume_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
SHORT = ["train.steps=24", "train.checkpoint_interval=12", "train.log_interval=2",
         "prune.start_step=2", "prune.end_step=16", "prune.compact_every=4",
         "data.dynamic_interval=6", "export.hf_dtype=fp32", "train.progress_bar=false",
         "prune.estimator=fisher", "distill.alpha=0.5", "distill.temperature=2.0"]
PP2 = ["parallel.pp=2"]


def _distill_run(rank, world_size, run_dir, extra):
    """Train; at the end also report, on this rank, the teacher's stage and whether any of its
    parameters is trainable, has a gradient or sits in the optimizer."""
    from megatron_effllm.parallel import comm
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import Trainer, run

    seen = {}
    finish = Trainer._finish

    def spy_finish(self, engine, pruning, *args):
        teacher, student = self.teacher.model, engine.module
        # ZeRO's optimizer: the model's parameters per group (its fp32 masters are slices of these)
        in_optimizer = [p for g in engine._ds.optimizer.bit16_groups for p in g]
        t_ids = {id(p) for p in teacher.parameters()}
        t_ptrs = {p.data_ptr() for p in teacher.parameters()}
        seen.update(
            arch=pruning.arch.to_dict(),
            pp_rank=comm.dims().pp_rank,
            teacher_stage=(len(teacher.decoder.layers), teacher.pre_process, teacher.post_process),
            student_stage=(len(student.decoder.layers), student.pre_process, student.post_process),
            teacher_frozen=all(not p.requires_grad and p.grad is None for p in teacher.parameters())
            and not teacher.training,
            teacher_in_optimizer=sum(id(p) in t_ids or p.data_ptr() in t_ptrs for p in in_optimizer),
            optimizer_numel=sum(p.numel() for p in in_optimizer),
            student_numel=sum(p.numel() for p in student.parameters() if p.requires_grad),
            teacher_numel=sum(p.numel() for p in teacher.parameters()),
        )
        return finish(self, engine, pruning, *args)

    Trainer._finish = spy_finish
    summary = run(load_config(TINY, SHORT + [f"run_dir={run_dir}"] + list(extra)))
    return summary, seen


def _train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def pp_distill_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pp_distill")
    pp2_dir, pp1_dir = str(base / "pp2"), str(base / "pp1")
    pp2 = run_ranks(_distill_run, world_size=2, args=(pp2_dir, PP2))
    ((pp1,),) = [run_ranks(_distill_run, world_size=1, args=(pp1_dir, []))]
    return pp2_dir, pp2, pp1_dir, pp1


def test_the_teacher_runs_in_stages_beside_the_student_and_outside_the_optimizer(pp_distill_runs):
    _, results, _, (_, ref) = pp_distill_runs
    for _, seen in results:
        assert seen["teacher_stage"] == seen["student_stage"] == (2, seen["pp_rank"] == 0, seen["pp_rank"] == 1)
        assert seen["teacher_frozen"], seen
        assert seen["teacher_in_optimizer"] == 0, seen
        assert seen["optimizer_numel"] == seen["student_numel"] < seen["teacher_numel"], seen
    # the two stages together hold the whole teacher (the tied embedding once per end stage)
    assert sum(s["teacher_numel"] for _, s in results) > ref["teacher_numel"]
    assert ref["teacher_stage"] == (4, True, True)


def test_pp2_distillation_matches_pp1(pp_distill_runs):
    from megatron_effllm.architecture import Architecture

    pp2_dir, ((s0, seen0), (s1, seen1)), pp1_dir, (r, ref) = pp_distill_runs
    assert seen0["arch"] == seen1["arch"] == ref["arch"]
    a = Architecture.load(os.path.join(pp2_dir, "final", "architecture.json"))
    print(f"PP=2 with distillation: {a.widths_summary()} hidden {a.hidden_size}")
    assert a.hidden_size < 64 and s0["final_params"] == r["final_params"] < 0.62 * r["source_params"]
    assert s0["final_loss"] == s1["final_loss"]  # one loss for the whole pipeline
    pp2, pp1 = _train_losses(pp2_dir), _train_losses(pp1_dir)
    assert sorted(pp2) == sorted(pp1) and len(pp1) == 12
    worst = max(abs(pp2[k] - pp1[k]) / abs(pp1[k]) for k in pp1)
    print(f"PP=2 vs PP=1 distillation losses over {len(pp1)} logged steps: max relative difference {worst:.1e}")
    # fp32 rounding of another summation order (each stage's matmuls and the pipeline's
    # accumulation), amplified by Adam over 24 steps (measured 2.1e-7): the LM-loss PP test's bound
    assert worst < 1e-5
    assert abs(s0["final_loss"] - r["final_loss"]) < 1e-5 * abs(r["final_loss"])


def test_pp2_distillation_resume_mid_prune_is_exact(pp_distill_runs, tmp_path):
    pp2_dir = pp_distill_runs[0]
    resumed = str(tmp_path / "resumed")
    _resume_copy(pp2_dir, resumed, 12)
    ((r0, _), _) = run_ranks(_distill_run, world_size=2, args=(resumed, PP2))
    assert r0["final_loss"] == pp_distill_runs[1][0][0]["final_loss"]
    a, b = _final_weights(pp2_dir), _final_weights(resumed)
    assert a.arch == b.arch
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
