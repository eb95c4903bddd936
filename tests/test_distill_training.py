"""Online distillation in the trainer (distill: config block): a teacher equal to the student
teaches nothing (zero KL, zero KD gradient) through the trainer's own loss at TP=2; a short tiny
run with distill.alpha=0.5 prunes, compacts and resumes bit-identically; a resume with another
teacher is refused."""
import os
import shutil

import pytest
import torch

from dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
SHORT = ["train.steps=24", "train.checkpoint_interval=12", "train.log_interval=4",
         "prune.start_step=2", "prune.end_step=16", "prune.compact_every=4",
         "data.dynamic_interval=6", "export.hf_dtype=fp32"]


def _gradients(rank, world_size, run_dir):
    """The trainer's loss and its gradients at TP=2 for distill.alpha 0 (no teacher), 0.5 and 1,
    the teacher being the source the student starts from."""
    from megatron_effllm.engine import build_engine
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.source import load_source
    from megatron_effllm.training.teacher import Teacher
    from megatron_effllm.training.trainer import Trainer

    cfg = load_config(TINY, [f"run_dir={run_dir}", "parallel.tp=2", "parallel.zero_stage=0",
                             "distill.alpha=0.5", "distill.temperature=2.0"])
    trainer = Trainer(cfg)
    arch, canonical, tokenizer = load_source(cfg)
    engine = build_engine("deepspeed", trainer._build_model(arch, canonical), trainer._engine_options())
    teacher = Teacher.build(cfg, arch, canonical, tokenizer)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, arch.vocab_size, (2, 17), generator=g)
    mask = torch.ones(2, 16)
    mask[1, 10:] = 0
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
             "position_ids": torch.arange(16).unsqueeze(0).expand(2, -1)}
    params = [p for p in engine.module.parameters() if p.requires_grad]
    out = {}
    for alpha in (0.0, 0.5, 1.0):
        teacher.alpha = alpha
        trainer.teacher = teacher if alpha else None
        loss = trainer._loss(engine, batch)
        engine.backward(loss, last_micro_batch=False, scale_with_accumulation=False)
        out[alpha] = (loss.detach(), [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    if trainer.lock is not None:  # rank 0 holds the run folder
        trainer.lock.release()
    (lm_loss, lm_grads), (half_loss, half_grads), (kd_loss, kd_grads) = out[0.0], out[0.5], out[1.0]
    return {  # plain values: tensors do not outlive the rank's process
        "kd_loss": float(kd_loss), "lm_loss": float(lm_loss),
        "kd_grads_zero": all(torch.equal(g, torch.zeros_like(g)) for g in kd_grads),
        # alpha = 0.5: exactly half the LM loss and its gradients (a power of two scales exactly)
        "half_loss_exact": torch.equal(half_loss, 0.5 * lm_loss),
        "half_grads_exact": all(torch.equal(h, 0.5 * g) for h, g in zip(half_grads, lm_grads)),
        "lm_grads_nonzero": sum(bool(g.abs().max() > 0) for g in lm_grads) / len(lm_grads),
    }


def test_a_teacher_equal_to_the_student_gives_zero_kl_and_zero_kd_gradient(tmp_path):
    for rank in run_ranks(_gradients, world_size=2, args=(str(tmp_path / "run"),)):
        assert rank["kd_loss"] == 0.0 and rank["lm_loss"] > 1.0, rank
        assert rank["kd_grads_zero"] and rank["half_loss_exact"] and rank["half_grads_exact"], rank
        assert rank["lm_grads_nonzero"] == 1.0, rank


def _train(rank, world_size, run_dir, extra):
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    return run(load_config(TINY, SHORT + [f"run_dir={run_dir}", "distill.alpha=0.5"] + list(extra)))


def _final_weights(run_dir):
    from megatron_effllm.convert.hf_io import load_hf_model

    return load_hf_model(os.path.join(run_dir, "final", "hf"))


def test_distillation_run_prunes_compacts_and_resumes_exactly(tmp_path):
    """DP=2, ZeRO-2, alpha=0.5 (the teacher is the tiny run's random source): it reaches the
    target through compactions; resumed from the mid-prune checkpoint it ends bit-identical (the
    teacher is rebuilt from its source, not read from the checkpoint); with another teacher the
    resume is refused in one line."""
    from megatron_effllm.errors import UserError

    full = str(tmp_path / "full")
    s, _ = run_ranks(_train, world_size=2, args=(full, []))
    assert s["final_params"] < 0.62 * s["source_params"]
    records = [line for line in open(os.path.join(full, "metrics.jsonl")) if '"kind": "compaction"' in line]
    assert len(records) >= 2
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(full, "checkpoints", "step_000012"),
                    os.path.join(resumed, "checkpoints", "step_000012"))
    shutil.copytree(os.path.join(full, "data"), os.path.join(resumed, "data"))
    # the trained student is another teacher than the source
    with pytest.raises(Exception) as err:
        run_ranks(_train, world_size=2, args=(resumed, [f"distill.teacher={os.path.join(full, 'final', 'hf')}"]))
    assert "distill.teacher (other contents)" in str(err.value) and UserError.__name__ in str(err.value)
    r, _ = run_ranks(_train, world_size=2, args=(resumed, []))
    assert r["final_loss"] == s["final_loss"]
    a, b = _final_weights(full), _final_weights(resumed)
    assert a.arch == b.arch
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
