"""Logit distillation that never gathers the vocabulary.

Under tensor parallelism the output layer leaves each rank with a slice of the vocabulary
(``[..., V / TP]``). The distillation term KL(teacher || student) at temperature T needs both
full-vocabulary softmaxes, but only through three scalars per token, each a max or a sum over the
vocabulary: these are reduced over the tensor-parallel group, as megatron-core's
``vocab_parallel_cross_entropy`` does for the LM loss, and everything else stays on the slice.

The gradient is closed-form: d KL / d s_v = (softmax(s / T)_v - softmax(t / T)_v) / T, computed on
each rank's slice from the saved probabilities, so the backward needs no communication at all.
A teacher equal to the student gives exactly zero (the same log-probabilities subtract).
"""
from __future__ import annotations

import torch

from megatron_effllm.parallel import comm


def vocab_parallel_logsumexp(x: torch.Tensor, group_name: str = "tp") -> torch.Tensor:
    """log sum_v exp(x_v) over the full vocabulary of fp32 slices ``[..., V / TP]``: ``[..., 1]``."""
    local = torch.logsumexp(x, dim=-1, keepdim=True)
    peak = local.clone()
    comm.all_reduce_(peak, group_name, "max")
    total = (local - peak).exp_()
    comm.all_reduce_(total, group_name, "sum")
    return total.log_().add_(peak)


class _VocabParallelKL(torch.autograd.Function):
    # Three vocabulary-sized buffers, the rest in place: at 49k-entry vocabularies these tensors
    # dominate the step's memory traffic (each fresh one is also page faults on a CPU).
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, group_name: str):
        s, t = student.detach().float(), teacher.detach().float()
        if temperature != 1.0:
            s, t = s / temperature, t / temperature
        log_p_teacher = t - vocab_parallel_logsumexp(t, group_name)
        p_teacher = log_p_teacher.exp()
        log_p_student = s - vocab_parallel_logsumexp(s, group_name)
        kl = log_p_teacher.sub_(log_p_student).mul_(p_teacher).sum(dim=-1)
        comm.all_reduce_(kl, group_name, "sum")
        # the gradient's two terms, kept in place of the student's log-probabilities
        ctx.save_for_backward(log_p_student.exp_().sub_(p_teacher))
        ctx.temperature = temperature
        ctx.student_dtype = student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        (p_diff,) = ctx.saved_tensors  # used once: scaled in place
        grad = p_diff.mul_(grad_kl.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.student_dtype), None, None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                      group_name: str = "tp") -> torch.Tensor:
    """Per-token KL(softmax(teacher / T) || softmax(student / T)) over the full vocabulary, from
    each rank's vocabulary slice (the same slice of both models); fp32, shape ``logits.shape[:-1]``,
    identical on every rank of the group. Differentiable in the student's logits only."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; the teacher must share the vocabulary")
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    return _VocabParallelKL.apply(student_logits, teacher_logits, float(temperature), group_name)


def distillation_loss(lm_loss: torch.Tensor, kl: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """Per-token ``alpha * T^2 * KL + (1 - alpha) * LM loss`` (T^2 keeps the KL's gradient scale
    independent of the temperature, as in Hinton et al.)."""
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * lm_loss.float()
