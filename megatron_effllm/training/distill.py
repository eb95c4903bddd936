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


# ---------------------------------------------------------------------------- top-k distillation
# A cached teacher keeps, per token, its k largest logits (ids and values) and the log of its
# probability mass outside them at temperature T. The KL is then taken between the two
# distributions coarsened to those k entries plus one "rest" bucket:
#     KL = sum_{i in top-k} p_i log(p_i / q_i) + r log(r / (1 - sum_{i in top-k} q_i)),
# a true KL (never negative, 0 for equal models), equal to the full-vocabulary KL when k = V
# (r = 0). Its gradient on the student's logit v is (q_v - p~_v) / T, where p~ is the teacher on
# the top-k and its rest mass r spread in proportion to the student's own probabilities
# elsewhere. Each tensor-parallel rank reads only the cached ids inside its vocabulary slice;
# two all-reduces of per-token scalars (max, then sum) replace the full KL's five.

def _slice_bounds(vocab_slice: int, group_name: str) -> tuple[int, int]:
    lo = comm.rank(group_name) * vocab_slice
    return lo, lo + vocab_slice


def _shared_logsumexp(parts: torch.Tensor, extra_sums: torch.Tensor, group_name: str):
    """Vocabulary-parallel logsumexps of the columns of ``parts`` ``[..., n]`` (each rank's local
    logsumexps, -inf allowed) and the group sums of ``extra_sums``, in one max and one sum."""
    peak = parts.clone()
    comm.all_reduce_(peak, group_name, "max")
    peak.clamp_(min=torch.finfo(peak.dtype).min)  # a column of -inf everywhere stays -inf
    summed = torch.cat([(parts - peak).exp_(), extra_sums], dim=-1)
    comm.all_reduce_(summed, group_name, "sum")
    n = parts.shape[-1]
    return summed[..., :n].log_().add_(peak), summed[..., n:]


def _teacher_log_probs(values: torch.Tensor, log_rest: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p_i of the top-k entries: their softmax scaled to the mass 1 - r left by the rest."""
    t = values.float() / temperature
    return t - torch.logsumexp(t, dim=-1, keepdim=True) + torch.log1p(-log_rest.float().exp()).unsqueeze(-1)


class _TopkVocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, ids, values, log_rest, temperature: float, group_name: str):
        z = student.detach().float().div(temperature)  # a fresh fp32 buffer, changed in place below
        lo, hi = _slice_bounds(z.shape[-1], group_name)
        mine = (ids >= lo) & (ids < hi)
        local = torch.where(mine, ids - lo, 0).long()
        log_p = _teacher_log_probs(values, log_rest, temperature)
        p = log_p.exp()
        z_top = z.gather(-1, local)
        part = torch.where(mine, p * (log_p - z_top), 0.0).sum(-1, keepdim=True)
        # the student outside the top-k: its slice with the top-k ids at -inf (one extra column
        # takes the ids of other ranks' slices)
        outside = torch.nn.functional.pad(z, (0, 1), value=float("-inf"))
        outside.scatter_(-1, torch.where(mine, local, z.shape[-1]), float("-inf"))
        lse, a = _shared_logsumexp(torch.stack([torch.logsumexp(z, -1), torch.logsumexp(outside, -1)], -1),
                                   part, group_name)
        ls, out_lse = lse[..., :1], lse[..., 1:]
        log_r = log_rest.float().unsqueeze(-1)
        r = log_r.exp()
        rest = torch.where(r > 0, r * (log_r - out_lse + ls), 0.0)  # 0 log 0 = 0
        kl = (a + ls * p.sum(-1, keepdim=True) + rest).squeeze(-1)
        # the gradient's two terms in place: q - p~, p~ outside the top-k = exp(log r + z - out_lse)
        inf = float("inf")
        shift = torch.where((log_r > -inf) & (out_lse > -inf), out_lse - log_r, inf)
        p_rest = outside[..., :-1].sub_(shift).exp_()
        diff = z.sub_(ls).exp_().sub_(p_rest)
        diff.scatter_add_(-1, local, torch.where(mine, -p, 0.0))
        ctx.save_for_backward(diff)
        ctx.temperature = temperature
        ctx.student_dtype = student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        (diff,) = ctx.saved_tensors
        grad = diff.mul_(grad_kl.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.student_dtype), None, None, None, None, None


def topk_vocab_parallel_kl(student_logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                           log_rest: torch.Tensor, temperature: float = 1.0, group_name: str = "tp") -> torch.Tensor:
    """Per-token KL(teacher || student at T) over the teacher's top-k entries and one bucket for
    the rest (see above), from this rank's vocabulary slice ``[..., V / TP]`` of the student's
    logits; the teacher as ``vocab_parallel_topk`` gives it: global ``ids`` ``[..., k]``, its raw
    logits ``values`` there (any float dtype) and ``log_rest`` ``[...]``. fp32, identical on every
    rank of the group; differentiable in the student's logits only."""
    if ids.shape != values.shape or ids.shape[:-1] != student_logits.shape[:-1] or log_rest.shape != ids.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)}, teacher ids {tuple(ids.shape)}, values "
                         f"{tuple(values.shape)} and rest {tuple(log_rest.shape)} do not describe the same tokens")
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    return _TopkVocabParallelKL.apply(student_logits, ids, values, log_rest, float(temperature), group_name)


@torch.no_grad()
def vocab_parallel_topk(logits: torch.Tensor, k: int, temperature: float = 1.0, group_name: str = "tp"):
    """The teacher's ``k`` largest logits over the full vocabulary from each rank's slice
    ``[..., V / TP]``: (global ids int64 ``[..., k]``, raw logits there (fp32), log of the
    probability mass outside them at temperature T ``[...]``, -inf when k = V), identical on every
    rank. Each rank sends only its own k largest, never its slice."""
    t = logits.float()
    lo, _ = _slice_bounds(t.shape[-1], group_name)
    values, ids = t.topk(min(k, t.shape[-1]), dim=-1)
    ids = ids + lo
    if comm.size(group_name) > 1:
        values = torch.cat(comm.all_gather(values, group_name), dim=-1)
        ids = torch.cat(comm.all_gather(ids, group_name), dim=-1)
        values, pick = values.topk(k, dim=-1)
        ids = ids.gather(-1, pick)
    if ids.shape[-1] != k:
        raise ValueError(f"top-{k} of a vocabulary of {ids.shape[-1]} entries")
    z = t / temperature
    mine = (ids >= lo) & (ids < lo + t.shape[-1])
    outside = torch.nn.functional.pad(z, (0, 1), value=float("-inf"))
    outside.scatter_(-1, torch.where(mine, ids - lo, t.shape[-1]), float("-inf"))
    lse, _ = _shared_logsumexp(torch.stack([torch.logsumexp(z, -1), torch.logsumexp(outside, -1)], -1),
                               z.new_zeros(z.shape[:-1] + (0,)), group_name)
    return ids, values, lse[..., 1] - lse[..., 0]
