"""Shared by the selectors: what may be removed (``Constraints``) and per-layer widths -> plan.

The selectors themselves (one module each in ``pruning/selectors/``, registered in
``registry.SELECTORS``) go from group scores to a ``PrunePlan``; here are the pieces they share:
removal order by score, the widths a removal ratio gives within the constraints, the bisection
on a parameter target, and ``plan_from_widths`` (keep the best groups at given widths), which
also serves a fixed target shape (``select_target_shape``, Sheared-LLaMA) and the L0 runtime.

Within a layer, groups are always ranked by their scores; ties are broken by index (the lower
index goes first), so every process computes the same plan from the same scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm.pruning.groups import PrunePlan, PruningError
from megatron_effllm.pruning.latency import LatencyTable
from megatron_effllm.pruning.saliency import GroupScores

COSTS = ("params", "latency")


@dataclass(frozen=True)
class Constraints:
    """What a selector may remove. Floors are per layer (heads counts all query heads).

    ``ffn_multiple`` / ``hidden_multiple``: widths the target runtime's kernels want (llama.cpp
    quantizes rows in blocks of 32, k-quants in 256). ``cost``: what the global ranking divides
    saliency by, parameters or decode seconds from ``latency`` (the target stays parameters).
    """

    tensor_parallel: int = 1
    min_heads: int = 1
    min_kv: int = 1
    min_ffn: int = 1
    min_hidden: int = 1
    ffn_multiple: int = 1
    hidden_multiple: int = 1
    prune_heads: bool = True
    prune_kv: bool = True
    prune_ffn: bool = True
    prune_hidden: bool = True
    allow_depth: bool = False  # whole layers may go (also the only way to lose a layer's last head)
    min_layers: int = 1
    cost: str = "params"
    latency: Optional[LatencyTable] = None

    def check(self, arch: Architecture) -> None:
        for name in ("tensor_parallel", "min_heads", "min_kv", "min_ffn", "min_hidden", "ffn_multiple",
                     "hidden_multiple", "min_layers"):
            if int(getattr(self, name)) < 1:
                raise PruningError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cost not in COSTS:
            raise PruningError(f"cost {self.cost!r} is not one of {', '.join(COSTS)}")
        if self.cost == "latency" and self.latency is None:
            raise PruningError("cost latency needs a latency table (prune.latency_table / --latency-table)")
        arch.validate(tensor_parallel=self.tensor_parallel)

    @property
    def ffn_step(self) -> int:
        return math.lcm(self.tensor_parallel, self.ffn_multiple)


def removal_order(v: torch.Tensor) -> list[int]:
    """Indices by ascending score, ties by ascending index (removal order)."""
    vals = v.detach().to("cpu", torch.float64).tolist()
    return sorted(range(len(vals)), key=lambda i: (vals[i], i))


def chunk(width: int, step: int) -> int:
    """Entries to remove so that the width reaches the next lower multiple of ``step``."""
    r = width % step
    return r if r else step


def ceil_multiple(x: int, step: int) -> int:
    return -(-x // step) * step  # smallest multiple of step >= x



# ---------------------------------------------------------------------- per-layer widths -> plan
def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def keep_in_layer(scores: GroupScores, l: int, kv_new: int, hpg_new: int, ffn_new: int):
    """Kept (heads, kv groups, ffn channels) of layer ``l`` at the given widths, by score."""
    shape = scores.arch.layers[l]
    K, hpg, F = shape.num_kv_groups, shape.heads_per_group, shape.ffn_hidden_size
    if hpg_new < hpg or kv_new < K:
        if scores.heads is None:
            raise PruningError("the estimator gives no head scores; query heads cannot be pruned with it")
    if kv_new < K and scores.kv is None:
        raise PruningError("the estimator gives no KV-group scores; keep the KV groups (prune heads within groups)")
    if ffn_new < F and scores.ffn is None:
        raise PruningError("the estimator gives no FFN scores; FFN channels cannot be pruned with it")
    per_group = []
    for g in range(K):
        members = list(range(g * hpg, (g + 1) * hpg))
        if hpg_new < hpg:
            hv = scores.heads[l].tolist()
            members = sorted(sorted(members, key=lambda h: (hv[h], h))[hpg - hpg_new:])
        per_group.append(members)
    groups = list(range(K))
    if kv_new < K:
        hv, kvv = scores.heads[l].tolist(), scores.kv[l].tolist()
        comp = [kvv[g] + sum(hv[h] for h in per_group[g]) for g in range(K)]
        groups = sorted(sorted(groups, key=lambda g: (comp[g], g))[K - kv_new:])
    heads = [h for g in groups for h in per_group[g]]
    ffn = list(range(F)) if ffn_new >= F else sorted(removal_order(scores.ffn[l])[F - ffn_new:])
    return heads, groups, ffn


def plan_from_widths(
    scores: GroupScores,
    widths: Sequence[tuple[int, int, int]],
    hidden: Optional[int] = None,
    kept_layers: Optional[Sequence[int]] = None,
) -> PrunePlan:
    """Keep, in every layer, the best groups at the given (kv groups, heads per group, FFN width)."""
    arch = scores.arch
    kept_layers = list(range(arch.num_layers)) if kept_layers is None else list(kept_layers)
    if len(widths) != len(kept_layers):
        raise PruningError(f"{len(widths)} layer widths given for {len(kept_layers)} kept layers")
    H, K, F = {}, {}, {}
    for l, (kv_new, hpg_new, ffn_new) in zip(kept_layers, widths):
        s = arch.layers[l]
        if not (1 <= kv_new <= s.num_kv_groups and 1 <= hpg_new <= s.heads_per_group and 1 <= ffn_new <= s.ffn_hidden_size):
            raise PruningError(
                f"layer {l}: target {kv_new} KV groups x {hpg_new} heads, FFN {ffn_new} is not within the current "
                f"{s.num_kv_groups} x {s.heads_per_group}, FFN {s.ffn_hidden_size} (widths can only shrink)"
            )
        H[l], K[l], F[l] = keep_in_layer(scores, l, kv_new, hpg_new, ffn_new)
    D = arch.hidden_size if hidden is None else int(hidden)
    if not 1 <= D <= arch.hidden_size:
        raise PruningError(f"hidden size {D} must be within 1..{arch.hidden_size}")
    if D < arch.hidden_size:
        if scores.hidden is None:
            raise PruningError("the estimator gives no hidden-channel scores; hidden channels cannot be pruned with it")
        kept_hidden = sorted(removal_order(scores.hidden)[arch.hidden_size - D:])
    else:
        kept_hidden = list(range(D))
    return PrunePlan.build(arch, kept_layers, H, K, F, kept_hidden)


def ratio_widths(shape: LayerShape, ratio: float, c: Constraints, prune_kv: bool) -> tuple[int, int, int]:
    """(kv, hpg, ffn) after removing the fraction ``ratio`` of a layer's widths, within constraints."""
    t = c.tensor_parallel
    K, hpg, F = shape.num_kv_groups, shape.heads_per_group, shape.ffn_hidden_size
    ratio = min(max(ratio, 0.0), 1.0)
    hpg_new = min(hpg, max(1, round_half_up(hpg * (1 - ratio)))) if c.prune_heads else hpg
    kv_new = K
    if prune_kv and c.prune_kv:
        kv_new = min(K, max(ceil_multiple(c.min_kv, t), round_half_up(K * (1 - ratio) / t) * t))
    while kv_new * hpg_new < c.min_heads and hpg_new < hpg:
        hpg_new += 1
    while kv_new * hpg_new < c.min_heads and kv_new < K:
        kv_new += t
    ffn_new = F
    if c.prune_ffn:
        step = c.ffn_step
        ffn_new = min(F, max(ceil_multiple(c.min_ffn, step), round_half_up(F * (1 - ratio) / step) * step))
    return kv_new, hpg_new, ffn_new


def hidden_width(D: int, ratio: float, c: Constraints) -> int:
    step = c.hidden_multiple
    return min(D, max(ceil_multiple(c.min_hidden, step), round_half_up(D * (1 - min(max(ratio, 0.0), 1.0)) / step) * step))


def params_at(arch: Architecture, widths, hidden: int) -> int:
    return arch.count_params(hidden, [(k * h, k, f) for k, h, f in widths])


def bisect_fraction(params_of, target: int, what: str) -> float:
    """Smallest x in [0, 1] (to 1e-9) with params_of(x) <= target; params_of must not increase with x."""
    if params_of(1.0) > target:
        raise PruningError(
            f"cannot reach {target:,} parameters with {what}: the floors stop at {params_of(1.0):,}; "
            "lower the floors or use the global selector with depth pruning"
        )
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if params_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------- fixed target shape (Sheared-LLaMA)
def select_target_shape(
    scores: GroupScores,
    *,
    heads: Union[int, Sequence[int]],
    ffn: Union[int, Sequence[int]],
    kv: Union[int, Sequence[int], None] = None,
    hidden: Optional[int] = None,
) -> PrunePlan:
    """Every layer ends at the given widths (ints apply to all layers); the best groups are kept."""
    arch = scores.arch
    n = arch.num_layers

    def per_layer(v, what):
        vals = [int(v)] * n if isinstance(v, int) else [int(x) for x in v]
        if len(vals) != n:
            raise PruningError(f"{what}: {len(vals)} values for {n} layers")
        return vals

    heads_l = per_layer(heads, "heads")
    kv_l = [s.num_kv_groups for s in arch.layers] if kv is None else per_layer(kv, "kv")
    ffn_l = per_layer(ffn, "ffn")
    widths = []
    for l, (h, k, f) in enumerate(zip(heads_l, kv_l, ffn_l)):
        if k < 1 or h % k:
            raise PruningError(f"layer {l}: {h} heads are not divisible by {k} KV groups; GQA needs equal groups")
        widths.append((k, h // k, f))
    return plan_from_widths(scores, widths, hidden)
