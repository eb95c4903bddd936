"""Hard-concrete L0 gates (Louizos et al. 2018) as Sheared-LLaMA uses them to learn a target shape.

One gate z per group, with a learned ``log_alpha``; temperature beta = 2/3, stretch (l, r) = (-0.1, 1.1):

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta) * (r - l) + l,  z = clamp(s, 0, 1)
    P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))

The expected model size is a differentiable function of the P(z != 0) (``expected_params``); a
Lagrangian lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 on the expected sparsity s_hat pushes it to
the target t (the lambdas ascend, the log_alphas descend). At the end the gates are made
deterministic (``deterministic_gates``) and folded into the weights.

Under GQA, give every layer one gate per *head slot* (position within a KV group) and expand it
over the groups (``expand_head_slots``), so all groups keep the same number of heads.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning.groups import PruningError

BETA = 2.0 / 3.0
LIMIT_L = -0.1
LIMIT_R = 1.1


def sample_gates(
    log_alpha: torch.Tensor,
    *,
    beta: float = BETA,
    l: float = LIMIT_L,
    r: float = LIMIT_R,
    u: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """A training-time sample of the gates (differentiable in ``log_alpha``)."""
    if u is None:
        u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype, device="cpu").to(log_alpha.device)
    u = u.clamp(eps, 1 - eps)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta) * (r - l) + l
    return s.clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, *, beta: float = BETA, l: float = LIMIT_L, r: float = LIMIT_R) -> torch.Tensor:
    """P(z != 0) of every gate: the differentiable 'expected score' of Sheared-LLaMA."""
    return torch.sigmoid(log_alpha - beta * math.log(-l / r))


def deterministic_gates(
    log_alpha: torch.Tensor, *, beta: float = BETA, l: float = LIMIT_L, r: float = LIMIT_R,
    keep: Optional[int] = None,
) -> torch.Tensor:
    """Test-time gates: keep the ``keep`` largest log_alpha (default round(sum P(z != 0))).

    Kept gates take the Louizos test-time value clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1),
    the rest are exactly zero; fold them into the weights, then slice the zeros away.
    """
    flat = log_alpha.detach().reshape(-1)
    if keep is None:
        keep = int(round(float(prob_nonzero(flat, beta=beta, l=l, r=r).sum())))
    keep = max(0, min(flat.numel(), keep))
    values = (torch.sigmoid(flat) * (r - l) + l).clamp(0.0, 1.0)
    mask = torch.zeros_like(flat)
    if keep:
        order = torch.sort(-flat, stable=True).indices[:keep]  # ties: lower index kept
        mask[order] = 1.0
    return (values * mask).reshape(log_alpha.shape)


def expand_head_slots(slot_gates: torch.Tensor, num_kv_groups: int) -> torch.Tensor:
    """Per-slot gates [heads_per_group] -> per-head gates [num_heads] (head j has slot j % hpg)."""
    return slot_gates.repeat(num_kv_groups)


def expected_params(
    arch: Architecture,
    *,
    hidden: Optional[torch.Tensor] = None,
    heads: Optional[Sequence[torch.Tensor]] = None,
    kv: Optional[Sequence[torch.Tensor]] = None,
    ffn: Optional[Sequence[torch.Tensor]] = None,
    layers: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Expected number of parameters when every group survives with the given probability.

    Gates are independent, so a q_proj entry of head h and hidden channel c survives with
    P(layer) P(kv group of h) P(h) P(c). Missing arguments mean "always kept". With 0/1
    probabilities that describe a well-formed shape this equals that Architecture's num_params().
    """
    ref = next((t for t in [hidden, layers, *(heads or []), *(kv or []), *(ffn or [])] if t is not None), None)
    dtype = ref.dtype if ref is not None else torch.float64
    device = ref.device if ref is not None else None
    one = lambda n: torch.ones(n, dtype=dtype, device=device)  # noqa: E731
    d = arch.head_dim
    pd = (hidden if hidden is not None else one(arch.hidden_size)).sum()
    total = pd * arch.vocab_size * (1 if arch.tie_word_embeddings else 2) + pd  # embeddings, final norm
    for i, s in enumerate(arch.layers):
        ph = heads[i] if heads is not None else one(s.num_heads)
        pg = kv[i] if kv is not None else one(s.num_kv_groups)
        pf = ffn[i] if ffn is not None else one(s.ffn_hidden_size)
        pl = layers[i] if layers is not None else torch.ones((), dtype=dtype, device=device)
        if ph.numel() != s.num_heads or pg.numel() != s.num_kv_groups or pf.numel() != s.ffn_hidden_size:
            raise PruningError(f"layer {i}: gate counts do not match the architecture's widths")
        heads_alive = (ph * pg.repeat_interleave(s.heads_per_group)).sum()
        groups_alive = pg.sum()
        bias = (heads_alive + 2 * groups_alive) * d if arch.qkv_bias else 0.0
        block = 2 * heads_alive * d * pd + 2 * groups_alive * d * pd + bias + 3 * pf.sum() * pd + 2 * pd
        total = total + pl * block
    return total


def lagrangian(expected_sparsity: torch.Tensor, target: float, lambda1: torch.Tensor, lambda2: torch.Tensor) -> torch.Tensor:
    """lambda1 (s - t) + lambda2 (s - t)^2; minimise over the gates, maximise over the lambdas."""
    gap = expected_sparsity - target
    return lambda1 * gap + lambda2 * gap * gap


def target_sparsity(step: int, warmup_steps: int, final: float, start: float = 0.0) -> float:
    """Target that ramps linearly from ``start`` to ``final`` over ``warmup_steps``, then stays."""
    if warmup_steps <= 0:
        return final
    frac = min(max(step / warmup_steps, 0.0), 1.0)
    return start + (final - start) * frac
