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

In a training run (``training.runtime.l0_runtime``) the gates end in a fixed shape, the same widths in
every layer as Sheared-LLaMA's targets are: ``uniform_widths`` turns the expected counts into
such a shape at the parameter target, ``fold_gates`` folds the test-time gate values
(``gate_values``) into the weights that read or write the gated activations.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import torch

from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm.pruning.groups import PruningError
from megatron_effllm.pruning.selection import Constraints

BETA = 2.0 / 3.0
LIMIT_L = -0.1
LIMIT_R = 1.1
# Sheared-LLaMA / CoFi initialise every gate at drop rate 0.5: log_alpha = log(1 - p) - log(p).
DROPRATE_INIT = 0.5


def init_log_alpha(droprate: float = DROPRATE_INIT) -> float:
    """The log_alpha whose gate is dropped with probability ``droprate`` before stretching."""
    if not 0.0 < droprate < 1.0:
        raise PruningError(f"droprate must be in (0, 1), got {droprate}")
    return math.log(1.0 - droprate) - math.log(droprate)


def noise_generator(*keys) -> torch.Generator:
    """A CPU generator seeded from ``keys`` (e.g. run seed, step, micro-batch).

    The same keys give the same draws in every process and after a restart, independent of any
    other random state; sha256 rather than ``hash()``, which Python salts per process.
    """
    digest = hashlib.sha256(repr(tuple(int(k) for k in keys)).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


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


def gate_values(log_alpha: torch.Tensor, *, l: float = LIMIT_L, r: float = LIMIT_R) -> torch.Tensor:
    """The Louizos test-time value of every gate: clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (r - l) + l).clamp(0.0, 1.0)


def deterministic_gates(
    log_alpha: torch.Tensor, *, beta: float = BETA, l: float = LIMIT_L, r: float = LIMIT_R,
    keep: Optional[int] = None,
) -> torch.Tensor:
    """Test-time gates: keep the ``keep`` largest log_alpha (default round(sum P(z != 0))).

    Kept gates take the test-time value (``gate_values``), the rest are exactly zero; fold them
    into the weights, then slice the zeros away.
    """
    flat = log_alpha.detach().reshape(-1)
    if keep is None:
        keep = int(round(float(prob_nonzero(flat, beta=beta, l=l, r=r).sum())))
    keep = max(0, min(flat.numel(), keep))
    values = gate_values(flat, l=l, r=r)
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
    pd = (hidden if hidden is not None else one(arch.hidden_size)).sum()
    widths = []
    for i, s in enumerate(arch.layers):
        ph = heads[i] if heads is not None else one(s.num_heads)
        pg = kv[i] if kv is not None else one(s.num_kv_groups)
        pf = ffn[i] if ffn is not None else one(s.ffn_hidden_size)
        if ph.numel() != s.num_heads or pg.numel() != s.num_kv_groups or pf.numel() != s.ffn_hidden_size:
            raise PruningError(f"layer {i}: gate counts do not match the architecture's widths")
        # A head survives with its KV group: expected live heads sum P(h) P(group of h).
        widths.append(((ph * pg.repeat_interleave(s.heads_per_group)).sum(), pg.sum(), pf.sum()))
    return arch.count_params(pd, widths, keep_layers=layers)


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


# ---------------------------------------------------------------------- the end of the soft phase
def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _ceil_multiple(x: int, step: int) -> int:
    return -(-int(x) // step) * step


def _sum(v: torch.Tensor) -> float:
    return float(v.detach().double().sum())


def expected_architecture(
    arch: Architecture,
    *,
    hidden: Optional[torch.Tensor] = None,
    heads: Optional[Sequence[torch.Tensor]] = None,
    ffn: Optional[Sequence[torch.Tensor]] = None,
) -> Architecture:
    """The shape the gates currently expect: every width rounded from its sum of P(z != 0).

    ``heads[l]`` holds per-head probabilities (slots expanded over the KV groups); KV groups and
    layers are kept. A description for logs and plots (at least one of everything), not a
    constraint-checked target.
    """
    layers = []
    for i, s in enumerate(arch.layers):
        K, hpg, F = s.num_kv_groups, s.heads_per_group, s.ffn_hidden_size
        if heads is not None:
            hpg = min(hpg, max(1, _round_half_up(_sum(heads[i]) / K)))
        if ffn is not None:
            F = min(F, max(1, _round_half_up(_sum(ffn[i]))))
        layers.append(LayerShape(K * hpg, K, F, s.source_index))
    D = arch.hidden_size if hidden is None else min(arch.hidden_size, max(1, _round_half_up(_sum(hidden))))
    return arch.replace(hidden_size=D, layers=tuple(layers))


def uniform_widths(
    arch: Architecture,
    target_params: int,
    constraints: Constraints = Constraints(),
    *,
    hidden: Optional[torch.Tensor] = None,
    heads: Optional[Sequence[torch.Tensor]] = None,
    ffn: Optional[Sequence[torch.Tensor]] = None,
) -> tuple[list[tuple[int, int, int]], int]:
    """A fixed target shape from the gates: ([(kv, heads per group, ffn)] per layer, hidden).

    Sheared-LLaMA's targets give every layer the same widths. Here the gates choose how the
    budget is split between query heads, FFN channels and hidden channels: each kind keeps the
    fraction f_k = sum P(z != 0) / width of all its gates (in every layer alike), scaled by one
    factor x, r_k = min(1, x f_k), rounded to the constraints (heads stay equal across the KV
    groups, FFN widths multiples of lcm(TP, ffn_multiple), the floors). The largest x whose
    shape has <= ``target_params`` parameters wins, so the learned proportions are kept and the
    target is met even when the expected size has not quite converged to it. Kinds without
    probabilities (None) keep their widths; KV groups and layers are always kept.
    """
    c = constraints
    c.check(arch)
    total = lambda vs, widths: sum(_sum(v) for v in vs) / max(1, sum(widths))  # noqa: E731
    f_head = total(heads, [s.num_heads for s in arch.layers]) if heads is not None else None
    f_ffn = total(ffn, [s.ffn_hidden_size for s in arch.layers]) if ffn is not None else None
    f_hid = _sum(hidden) / arch.hidden_size if hidden is not None else None
    fracs = [max(f, 1e-9) for f in (f_head, f_ffn, f_hid) if f is not None]
    if not fracs:
        raise PruningError("uniform_widths needs the gate probabilities of at least one kind")
    step, hstep = c.ffn_step, c.hidden_multiple

    def shape(x: float):
        widths = []
        for s in arch.layers:
            K, hpg, F = s.num_kv_groups, s.heads_per_group, s.ffn_hidden_size
            if f_head is not None and c.prune_heads:
                r = min(1.0, x * f_head)
                hpg = min(hpg, max(1, -(-c.min_heads // K), _round_half_up(hpg * r)))
            if f_ffn is not None and c.prune_ffn:
                r = min(1.0, x * f_ffn)
                F = min(F, max(_ceil_multiple(c.min_ffn, step), _round_half_up(F * r / step) * step))
            widths.append((K, hpg, F))
        D = arch.hidden_size
        if f_hid is not None and c.prune_hidden:
            r = min(1.0, x * f_hid)
            D = min(D, max(_ceil_multiple(c.min_hidden, hstep), _round_half_up(D * r / hstep) * hstep))
        return widths, D

    def params(x: float) -> int:
        widths, D = shape(x)
        return arch.count_params(D, [(k * h, k, f) for k, h, f in widths])

    floor = params(0.0)
    if floor > target_params:
        raise PruningError(
            f"cannot reach {target_params:,} parameters with a uniform shape that keeps every KV group "
            f"and layer: the floors stop at {floor:,}; raise the target or lower the floors"
        )
    lo, hi = 0.0, 1.0 / min(fracs)  # at hi every kind is at its full width
    for _ in range(60):  # params() only grows with x
        mid = 0.5 * (lo + hi)
        if params(mid) <= target_params:
            lo = mid
        else:
            hi = mid
    return shape(lo)


def fold_gates(
    tensors: dict[str, torch.Tensor],
    arch: Architecture,
    *,
    hidden: Optional[torch.Tensor] = None,
    heads: Optional[Sequence[torch.Tensor]] = None,
    ffn: Optional[Sequence[torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """Canonical tensors of ``arch`` with gate values folded in (a copy; the function is kept).

    ``heads[l]`` [num_heads] scaled the input of o_proj, ``ffn[l]`` [ffn] the input of
    down_proj: their input columns take the values. ``hidden`` [hidden] scaled the residual
    stream where it is written (embedding output, o_proj and down_proj outputs): the embedding
    columns and the o_proj / down_proj rows take it, which gives the same stream. A tied
    embedding is also the lm_head, where the gate never was: the final norm weight is divided by
    the gate to cancel it there (a zero gate leaves a zero channel, which the lm_head never reads,
    so its norm weight stays).
    """
    out = dict(tensors)

    def scale(name, v, dim):
        if name not in out:  # any subset of the tensors may be folded (one at a time, at a compaction)
            return
        t = out[name]
        shape = [1] * t.dim()
        shape[dim] = -1
        out[name] = t * v.to(device=t.device, dtype=t.dtype).view(shape)

    d = arch.head_dim
    for l in range(arch.num_layers):
        p = f"model.layers.{l}."
        if heads is not None:
            scale(p + "self_attn.o_proj.weight", heads[l].repeat_interleave(d), 1)
        if ffn is not None:
            scale(p + "mlp.down_proj.weight", ffn[l], 1)
        if hidden is not None:
            scale(p + "self_attn.o_proj.weight", hidden, 0)
            scale(p + "mlp.down_proj.weight", hidden, 0)
    if hidden is not None:
        scale("model.embed_tokens.weight", hidden, 1)
        if arch.tie_word_embeddings:
            h = hidden.double()
            inv = torch.where(h > 0, 1.0 / torch.where(h > 0, h, torch.ones_like(h)), torch.ones_like(h))
            scale("model.norm.weight", inv, 0)
    return out
