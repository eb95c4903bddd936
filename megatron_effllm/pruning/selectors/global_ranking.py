"""Global cost-aware ranking (the ``efficientllm`` strategy's selector).

All removable units of every kind compete in one ranking by saliency per cost (parameters
removed, or decode seconds saved with ``cost="latency"``); the cheapest-to-lose are taken until
the parameter target is met. Units: one query head from every KV group of a layer (GQA stays
equal), ``t`` KV groups with their heads (t = tensor parallel size), ``t`` FFN channels, one
hidden channel, a whole layer (if allowed). Costs are recomputed after every take, since a
unit's size depends on the other widths (a hidden channel costs one parameter per surviving head
row, FFN row, ...). Ties are broken by index, so every process computes the same plan.

Kernel-friendly widths (``ffn_multiple`` / ``hidden_multiple``): the fine ranking runs to the
target first (it shares the budget between kinds and layers at channel granularity), then every
FFN width and the hidden size go up to their multiple, and the ranking goes on to the target with
the marginal blocks (the next ``multiple`` channels of a width) as FFN and hidden units: the
least salient blocks per cost go, and the result lies within one unit below the target.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_effllm.architecture import LayerShape
from megatron_effllm.pruning.groups import PrunePlan, PruningError, head_cost, kv_own_cost
from megatron_effllm.pruning.registry import SELECTORS
from megatron_effllm.pruning.saliency import GroupScores
from megatron_effllm.pruning.selection import Constraints, ceil_multiple, chunk, removal_order
from megatron_effllm.pruning.selectors.base import Selector


@SELECTORS.register
class GlobalRanking(Selector):
    name = "global"
    description = "one cost-aware ranking of heads, KV groups, FFN and hidden channels (and layers) over the model"

    def select(self, scores, target_params, constraints, **_):
        return select_global(scores, target_params, constraints)


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
        if current <= target_params and state.ffn_chunk * state.hidden_chunk < c.ffn_step * c.hidden_multiple:
            current = _round_up(state)  # kernel-friendly widths: the marginal blocks compete
    plan = state.plan()
    if plan.after.num_params() != current:
        raise AssertionError(f"internal cost mismatch: {plan.after.num_params()} != {current}")
    return plan


def _round_up(state: "_GlobalState") -> int:
    """Every FFN width and the hidden size up to its multiple (capped at the source width: an
    unpruned width stays), the most salient removed channels coming back; returns the count."""
    c, arch = state.c, state.arch
    for l in state.alive:
        state.ffn_width[l] = min(ceil_multiple(state.ffn_width[l], c.ffn_step), arch.layers[l].ffn_hidden_size)
    D = min(ceil_multiple(state.D, c.hidden_multiple), arch.hidden_size)
    state.hid_removed -= D - state.D
    state.D = D
    state.ffn_chunk, state.hidden_chunk = c.ffn_step, c.hidden_multiple
    state._refresh_all()
    return state.count()


class _GlobalState:
    """Widths and removal orders during the global ranking; one cached best unit per layer."""

    def __init__(self, scores: GroupScores, c: Constraints):
        arch = self.arch = scores.arch
        self.c = c
        self.lat = c.latency if c.cost == "latency" else None
        self.ffn_chunk, self.hidden_chunk = c.tensor_parallel, 1  # until _round_up
        # floors rounded up to the multiples, so rounding a width down never crosses its floor
        self.min_ffn = ceil_multiple(max(1, c.min_ffn), c.ffn_step)
        self.min_hidden = ceil_multiple(max(1, c.min_hidden), c.hidden_multiple)
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
        self.ffn_order = [removal_order(v) for v in scores.ffn] if self.use_ffn else None
        self.ffn_vals = [as_list(v) for v in scores.ffn] if self.use_ffn else None
        self.ffn_width = [s.ffn_hidden_size for s in arch.layers]
        self.hid_order = removal_order(scores.hidden) if self.use_hidden else None
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
        c, t, lat = self.c, self.c.tensor_parallel, self.lat
        best = None

        def offer(kind, score, cost, seconds):
            nonlocal best
            cand = (score / (cost if lat is None else seconds), _KIND_ORDER[kind], l, kind, cost)
            if best is None or cand[:3] < best[:3]:
                best = cand

        k, hpg = len(self.kv_alive[l]), self.hpg[l]
        if self.use_heads and hpg > 1 and k * (hpg - 1) >= c.min_heads:
            r = self._removed_heads(l)
            offer("head", sum(self.H[l][self.head_order[l][g][r]] for g in self.kv_alive[l]), k * self.hc,
                  lat and k * lat.unit("head"))
        if self.use_kv and k - t >= max(t, c.min_kv) and (k - t) * hpg >= c.min_heads:
            offer("kv", sum(sorted(self._group_score(l, g) for g in self.kv_alive[l])[:t]),
                  t * (self.kc + hpg * self.hc), lat and t * (lat.unit("kv") + hpg * lat.unit("head")))
        if self.use_ffn:
            m = chunk(self.ffn_width[l], self.ffn_chunk)
            if self.ffn_width[l] - m >= self.min_ffn:
                done = self.arch.layers[l].ffn_hidden_size - self.ffn_width[l]
                offer("ffn", sum(self.ffn_vals[l][i] for i in self.ffn_order[l][done:done + m]), m * 3 * self.D,
                      lat and m * lat.unit("ffn"))
        if self.use_layers and len(self.alive) > c.min_layers:
            offer("layer", self.layer_scores[l], self.a.layer_params(LayerShape(k * hpg, k, self.ffn_width[l], 0)),
                  lat and lat.unit("layer") + k * hpg * lat.unit("head") + k * lat.unit("kv")
                  + self.ffn_width[l] * lat.unit("ffn"))
        return best

    def _hidden_best(self):
        if not self.use_hidden:
            return None
        m = chunk(self.D, self.hidden_chunk)
        if self.D - m < self.min_hidden:
            return None
        cost = m * self.hidden_channel_params()
        score = sum(self.hid_vals[i] for i in self.hid_order[self.hid_removed:self.hid_removed + m])
        return (score / (cost if self.lat is None else m * self.lat.unit("hidden")), _KIND_ORDER["hidden"], -1,
                "hidden", cost)

    def hidden_channel_params(self) -> int:
        return (self.arch.vocab_size * (1 if self.arch.tie_word_embeddings else 2)
                + sum(self.hidden_per_layer.values()) + 1)

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
            self.ffn_width[l] -= chunk(self.ffn_width[l], self.ffn_chunk)
        elif kind == "hidden":
            m = chunk(self.D, self.hidden_chunk)
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

    def count(self) -> int:
        """Parameters at the current widths."""
        keep = [1 if l in self.alive else 0 for l in range(self.arch.num_layers)]
        widths = [(len(self.kv_alive[l]) * self.hpg[l], len(self.kv_alive[l]), self.ffn_width[l])
                  for l in range(self.arch.num_layers)]
        return self.arch.count_params(self.D, widths, keep_layers=keep)

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
