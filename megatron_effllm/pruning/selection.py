"""Selectors: from group scores and an Architecture to a PrunePlan (new Architecture + kept indices).

- ``select_global``: the default. All removable units of every kind compete in one ranking by
  saliency per parameter removed; the cheapest-to-lose are taken until the parameter target is
  met. Units: one query head from every KV group of a layer (GQA stays equal), ``t`` KV groups
  with their heads (t = tensor parallel size), a chunk of FFN channels (keeps the width a
  multiple of lcm(t, ffn_multiple)), a chunk of hidden channels, a whole layer (if allowed).
  Costs are recomputed after every take, since a unit's size depends on the other widths
  (a hidden channel costs one parameter per surviving head row, FFN row, ...).
- ``select_uniform``: the same fraction of every width in every layer (LLM-Pruner / Minitron).
- ``select_layerwise`` / ``select_adaptive``: per-layer sparsity, the Adapt-Pruner update
  s_l <- clip(s_l + ds - A * I_hat_l, 0, 0.99) with layer importance I_l = -mean cos(x_in, x_out).
- ``select_target_shape``: every layer ends at given widths (Sheared-LLaMA).

Within a layer, groups are always ranked by their scores; ties are broken by index (the lower
index goes first), so every process computes the same plan from the same scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm.pruning.groups import PrunePlan, PruningError, head_cost, kv_own_cost
from megatron_effllm.pruning.saliency import GroupScores, normalise_importance


@dataclass(frozen=True)
class Constraints:
    """What a selector may remove. Floors are per layer (heads counts all query heads)."""

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

    def check(self, arch: Architecture) -> None:
        for name in ("tensor_parallel", "min_heads", "min_kv", "min_ffn", "min_hidden", "ffn_multiple",
                     "hidden_multiple", "min_layers"):
            if int(getattr(self, name)) < 1:
                raise PruningError(f"{name} must be >= 1, got {getattr(self, name)}")
        arch.validate(tensor_parallel=self.tensor_parallel)

    @property
    def ffn_step(self) -> int:
        return math.lcm(self.tensor_parallel, self.ffn_multiple)


def _order(v: torch.Tensor) -> list[int]:
    """Indices by ascending score, ties by ascending index (removal order)."""
    vals = v.detach().to("cpu", torch.float64).tolist()
    return sorted(range(len(vals)), key=lambda i: (vals[i], i))


def _chunk(width: int, step: int) -> int:
    """Entries to remove so that the width reaches the next lower multiple of ``step``."""
    r = width % step
    return r if r else step


def _ceil_multiple(x: int, step: int) -> int:
    return -(-x // step) * step  # smallest multiple of step >= x


# ---------------------------------------------------------------------- global ranking
_KIND_ORDER = {"hidden": 0, "layer": 1, "kv": 2, "head": 3, "ffn": 4}


def select_global(
    scores: GroupScores,
    target_params: int,
    constraints: Constraints = Constraints(),
) -> PrunePlan:
    """Cost-aware global ranking down to ``target_params`` (total, embeddings included).

    Stops at the first take that brings the count to <= target, so the result lies within one
    unit's cost below the target. Raises PruningError if the constraints stop it earlier.
    """
    arch, c = scores.arch, constraints
    c.check(arch)
    if target_params >= arch.num_params():
        return PrunePlan.identity(arch)
    state = _GlobalState(scores, c)
    current = arch.num_params()
    while current > target_params:
        best = state.best()
        if best is None:
            raise PruningError(
                f"cannot reach {target_params:,} parameters: stopped at {current:,} with every layer at its "
                "floor; lower the floors (min heads/FFN/hidden), allow depth pruning, or raise the target"
            )
        current -= state.take(best)
    plan = state.plan()
    if plan.after.num_params() != current:
        raise AssertionError(f"internal cost mismatch: {plan.after.num_params()} != {current}")
    return plan


class _GlobalState:
    """Widths and removal orders during the global ranking; one cached best unit per layer."""

    def __init__(self, scores: GroupScores, c: Constraints):
        arch = self.arch = scores.arch
        self.c = c
        as_list = lambda v: v.detach().to("cpu", torch.float64).tolist()  # noqa: E731
        self.use_heads = c.prune_heads and scores.heads is not None
        self.use_kv = c.prune_kv and scores.kv is not None and scores.heads is not None
        self.use_ffn = c.prune_ffn and scores.ffn is not None
        self.use_hidden = c.prune_hidden and scores.hidden is not None
        self.use_layers = c.allow_depth and scores.layers is not None
        self.H = [as_list(v) for v in scores.heads] if scores.heads is not None else None
        self.KV = [as_list(v) for v in scores.kv] if scores.kv is not None else None
        self.alive = list(range(arch.num_layers))
        # per layer, per KV group: its heads in removal order (ascending score, then index)
        self.head_order, self.kv_alive, self.hpg = [], [], []
        for l, s in enumerate(arch.layers):
            per = s.heads_per_group
            groups = [list(range(g * per, (g + 1) * per)) for g in range(s.num_kv_groups)]
            if self.H is not None:
                for members in groups:
                    members.sort(key=lambda h: (self.H[l][h], h))
            self.head_order.append(groups)
            self.kv_alive.append(list(range(s.num_kv_groups)))
            self.hpg.append(per)
        self.ffn_order = [_order(v) for v in scores.ffn] if self.use_ffn else None
        self.ffn_vals = [as_list(v) for v in scores.ffn] if self.use_ffn else None
        self.ffn_width = [s.ffn_hidden_size for s in arch.layers]
        self.hid_order = _order(scores.hidden) if self.use_hidden else None
        self.hid_vals = as_list(scores.hidden) if self.use_hidden else None
        self.hid_removed = 0
        self.D = arch.hidden_size
        self.layer_scores = as_list(scores.layers) if self.use_layers else None
        self.cache: dict[int, Optional[tuple]] = {}
        self._refresh_all()

    # ------------------------------------------------------------------ widths and costs
    def _removed_heads(self, l):
        return self.arch.layers[l].heads_per_group - self.hpg[l]

    def _group_score(self, l, g):
        own = self.KV[l][g] if self.KV is not None else 0.0
        return own + sum(self.H[l][h] for h in self.head_order[l][g][self._removed_heads(l):])

    def _hidden_per_layer(self, l):
        k = len(self.kv_alive[l])
        return (2 * k * self.hpg[l] + 2 * k) * self.arch.head_dim + 3 * self.ffn_width[l] + 2

    def _refresh_all(self):
        a = self.arch.replace(hidden_size=self.D) if self.D != self.arch.hidden_size else self.arch
        self.hc, self.kc = head_cost(a), kv_own_cost(a)
        self.a = a
        self.hidden_per_layer = {l: self._hidden_per_layer(l) for l in self.alive}
        for l in self.alive:
            self.cache[l] = self._layer_best(l)

    # ------------------------------------------------------------------ candidates
    def _layer_best(self, l):
        """Cheapest unit of layer l: (ratio, kind order, layer, kind, cost) or None."""
        c, t = self.c, self.c.tensor_parallel
        best = None

        def offer(kind, score, cost):
            nonlocal best
            cand = (score / cost, _KIND_ORDER[kind], l, kind, cost)
            if best is None or cand[:3] < best[:3]:
                best = cand

        k, hpg = len(self.kv_alive[l]), self.hpg[l]
        if self.use_heads and hpg > 1 and k * (hpg - 1) >= c.min_heads:
            r = self._removed_heads(l)
            offer("head", sum(self.H[l][self.head_order[l][g][r]] for g in self.kv_alive[l]), k * self.hc)
        if self.use_kv and k - t >= max(t, c.min_kv) and (k - t) * hpg >= c.min_heads:
            offer("kv", sum(sorted(self._group_score(l, g) for g in self.kv_alive[l])[:t]),
                  t * (self.kc + hpg * self.hc))
        if self.use_ffn:
            m = _chunk(self.ffn_width[l], c.ffn_step)
            if self.ffn_width[l] - m >= max(1, c.min_ffn):
                done = self.arch.layers[l].ffn_hidden_size - self.ffn_width[l]
                offer("ffn", sum(self.ffn_vals[l][i] for i in self.ffn_order[l][done:done + m]), m * 3 * self.D)
        if self.use_layers and len(self.alive) > c.min_layers:
            offer("layer", self.layer_scores[l], self.a.layer_params(LayerShape(k * hpg, k, self.ffn_width[l], 0)))
        return best

    def _hidden_best(self):
        if not self.use_hidden:
            return None
        m = _chunk(self.D, self.c.hidden_multiple)
        if self.D - m < self.c.min_hidden:
            return None
        cost = m * (self.arch.vocab_size * (1 if self.arch.tie_word_embeddings else 2)
                    + sum(self.hidden_per_layer.values()) + 1)
        score = sum(self.hid_vals[i] for i in self.hid_order[self.hid_removed:self.hid_removed + m])
        return (score / cost, _KIND_ORDER["hidden"], -1, "hidden", cost)

    def best(self):
        cands = [v for v in self.cache.values() if v is not None]
        h = self._hidden_best()
        if h is not None:
            cands.append(h)
        return min(cands, key=lambda v: v[:3]) if cands else None

    def take(self, cand) -> int:
        """Apply a unit; returns the parameters it removed."""
        _, _, l, kind, cost = cand
        t = self.c.tensor_parallel
        if kind == "head":
            self.hpg[l] -= 1
        elif kind == "kv":
            gone = sorted(self.kv_alive[l], key=lambda g: (self._group_score(l, g), g))[:t]
            self.kv_alive[l] = [g for g in self.kv_alive[l] if g not in gone]
        elif kind == "ffn":
            self.ffn_width[l] -= _chunk(self.ffn_width[l], self.c.ffn_step)
        elif kind == "hidden":
            m = _chunk(self.D, self.c.hidden_multiple)
            self.hid_removed += m
            self.D -= m
        else:
            self.alive.remove(l)
            del self.cache[l]
        if kind == "hidden" or (kind == "layer" and len(self.alive) <= self.c.min_layers):
            self._refresh_all()  # every cost depends on the hidden size; layer units may have run out
        elif kind == "layer":
            del self.hidden_per_layer[l]
        else:
            self.hidden_per_layer[l] = self._hidden_per_layer(l)
            self.cache[l] = self._layer_best(l)
        return cost

    def plan(self) -> PrunePlan:
        arch = self.arch
        heads, kv, ffn = {}, {}, {}
        for l in self.alive:
            kv[l] = sorted(self.kv_alive[l])
            r = self._removed_heads(l)
            heads[l] = sorted(h for g in self.kv_alive[l] for h in self.head_order[l][g][r:])
            done = arch.layers[l].ffn_hidden_size - self.ffn_width[l]
            ffn[l] = sorted(self.ffn_order[l][done:]) if self.use_ffn else list(range(self.ffn_width[l]))
        hidden = sorted(self.hid_order[self.hid_removed:]) if self.use_hidden else list(range(arch.hidden_size))
        return PrunePlan.build(arch, self.alive, heads, kv, ffn, hidden)


# ---------------------------------------------------------------------- per-layer widths -> plan
def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _keep_in_layer(scores: GroupScores, l: int, kv_new: int, hpg_new: int, ffn_new: int):
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
    ffn = list(range(F)) if ffn_new >= F else sorted(_order(scores.ffn[l])[F - ffn_new:])
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
        H[l], K[l], F[l] = _keep_in_layer(scores, l, kv_new, hpg_new, ffn_new)
    D = arch.hidden_size if hidden is None else int(hidden)
    if not 1 <= D <= arch.hidden_size:
        raise PruningError(f"hidden size {D} must be within 1..{arch.hidden_size}")
    if D < arch.hidden_size:
        if scores.hidden is None:
            raise PruningError("the estimator gives no hidden-channel scores; hidden channels cannot be pruned with it")
        kept_hidden = sorted(_order(scores.hidden)[arch.hidden_size - D:])
    else:
        kept_hidden = list(range(D))
    return PrunePlan.build(arch, kept_layers, H, K, F, kept_hidden)


def _ratio_widths(shape: LayerShape, ratio: float, c: Constraints, prune_kv: bool) -> tuple[int, int, int]:
    """(kv, hpg, ffn) after removing the fraction ``ratio`` of a layer's widths, within constraints."""
    t = c.tensor_parallel
    K, hpg, F = shape.num_kv_groups, shape.heads_per_group, shape.ffn_hidden_size
    ratio = min(max(ratio, 0.0), 1.0)
    hpg_new = min(hpg, max(1, _round(hpg * (1 - ratio)))) if c.prune_heads else hpg
    kv_new = K
    if prune_kv and c.prune_kv:
        kv_new = min(K, max(_ceil_multiple(c.min_kv, t), _round(K * (1 - ratio) / t) * t))
    while kv_new * hpg_new < c.min_heads and hpg_new < hpg:
        hpg_new += 1
    while kv_new * hpg_new < c.min_heads and kv_new < K:
        kv_new += t
    ffn_new = F
    if c.prune_ffn:
        step = c.ffn_step
        ffn_new = min(F, max(_ceil_multiple(c.min_ffn, step), _round(F * (1 - ratio) / step) * step))
    return kv_new, hpg_new, ffn_new


def _hidden_width(D: int, ratio: float, c: Constraints) -> int:
    step = c.hidden_multiple
    return min(D, max(_ceil_multiple(c.min_hidden, step), _round(D * (1 - min(max(ratio, 0.0), 1.0)) / step) * step))


def _params(arch: Architecture, widths, hidden: int) -> int:
    layers = [LayerShape(k * h, k, f, s.source_index) for (k, h, f), s in zip(widths, arch.layers)]
    return arch.replace(hidden_size=hidden, layers=tuple(layers)).num_params()


def _bisect(params_of, target: int, what: str) -> float:
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


# ---------------------------------------------------------------------- uniform ratio
def select_uniform(
    scores: GroupScores,
    *,
    ratio: Optional[float] = None,
    target_params: Optional[int] = None,
    constraints: Constraints = Constraints(),
    prune_kv: bool = False,
) -> PrunePlan:
    """Remove the same fraction of heads per group, FFN channels (and hidden channels) in every layer.

    Give ``ratio`` directly, or ``target_params`` to find the smallest ratio that meets it.
    KV groups are kept unless ``prune_kv`` (Minitron prunes heads within groups).
    """
    arch, c = scores.arch, constraints
    c.check(arch)
    if (ratio is None) == (target_params is None):
        raise PruningError("give exactly one of ratio= or target_params= to the uniform selector")
    prune_hidden = c.prune_hidden and scores.hidden is not None

    def widths(r):
        return [_ratio_widths(s, r, c, prune_kv) for s in arch.layers]

    def hidden(r):
        return _hidden_width(arch.hidden_size, r, c) if prune_hidden else arch.hidden_size

    if ratio is None:
        if target_params >= arch.num_params():
            return PrunePlan.identity(arch)
        ratio = _bisect(lambda r: _params(arch, widths(r), hidden(r)), target_params, "a uniform ratio")
    return plan_from_widths(scores, widths(ratio), hidden(ratio))


# ---------------------------------------------------------------------- layer-wise sparsity (Adapt-Pruner)
def select_layerwise(
    scores: GroupScores,
    sparsity: Sequence[float],
    constraints: Constraints = Constraints(),
    prune_kv: bool = False,
    hidden_ratio: float = 0.0,
) -> PrunePlan:
    """Layer l loses the fraction sparsity[l] of its heads per group and FFN channels."""
    arch, c = scores.arch, constraints
    c.check(arch)
    s = [float(x) for x in sparsity]
    if len(s) != arch.num_layers:
        raise PruningError(f"{len(s)} sparsities given for {arch.num_layers} layers")
    widths = [_ratio_widths(shape, r, c, prune_kv) for shape, r in zip(arch.layers, s)]
    D = _hidden_width(arch.hidden_size, hidden_ratio, c) if hidden_ratio > 0 else arch.hidden_size
    return plan_from_widths(scores, widths, D)


def adapt_pruner_update(
    sparsity: torch.Tensor, importance: torch.Tensor, ds: float, A: float = 0.02
) -> torch.Tensor:
    """One Adapt-Pruner step: s_l <- clip(s_l + ds - A * I_hat_l, 0, 0.99), I_hat in [-1, 1].

    More important layers (higher I_l = -mean cos(x_in, x_out)) get less additional sparsity.
    """
    s = torch.as_tensor(sparsity, dtype=torch.float64)
    if s.shape != importance.shape:
        raise PruningError(f"{s.numel()} sparsities for {importance.numel()} layer importances")
    return (s + ds - A * normalise_importance(importance)).clamp(0.0, 0.99)


def select_adaptive(
    scores: GroupScores,
    importance: torch.Tensor,
    target_params: int,
    *,
    sparsity: Optional[torch.Tensor] = None,
    steps: int = 1,
    A: float = 0.02,
    constraints: Constraints = Constraints(),
    prune_kv: bool = False,
) -> tuple[PrunePlan, torch.Tensor]:
    """Apply ``steps`` Adapt-Pruner updates with the increment ds found to meet ``target_params``.

    Returns the plan and the new per-layer sparsity (relative to ``scores.arch``); a prune-train
    loop calls this once per stage with fresh importances (steps=1), a one-shot prune with
    steps > 1 lets the layer differences build up as they would over several stages.
    """
    arch, c = scores.arch, constraints
    c.check(arch)
    if steps < 1:
        raise PruningError(f"steps must be >= 1, got {steps}")
    s0 = torch.zeros(arch.num_layers, dtype=torch.float64) if sparsity is None else torch.as_tensor(sparsity, dtype=torch.float64)
    importance = torch.as_tensor(importance, dtype=torch.float64)

    def run(ds):
        s = s0
        for _ in range(steps):
            s = adapt_pruner_update(s, importance, ds, A)
        return s

    def params_of(ds):
        s = run(ds).tolist()
        return _params(arch, [_ratio_widths(sh, r, c, prune_kv) for sh, r in zip(arch.layers, s)], arch.hidden_size)

    ds = _bisect(params_of, target_params, "adaptive layer-wise sparsity") if target_params < arch.num_params() else 0.0
    s = run(ds)
    return select_layerwise(scores, s.tolist(), c, prune_kv=prune_kv), s


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
