"""The same ratio in every layer (the ``uniform`` strategy's selector; LLM-Pruner / Minitron)."""
from __future__ import annotations

from typing import Optional

from megatron_effllm.pruning.groups import PrunePlan, PruningError
from megatron_effllm.pruning.registry import SELECTORS
from megatron_effllm.pruning.saliency import GroupScores
from megatron_effllm.pruning.selection import (
    Constraints,
    bisect_fraction,
    hidden_width,
    params_at,
    plan_from_widths,
    ratio_widths,
)
from megatron_effllm.pruning.selectors.base import Selector


@SELECTORS.register
class Uniform(Selector):
    name = "uniform"
    description = "the same fraction of heads, FFN (and hidden) channels in every layer"

    def select(self, scores, target_params, constraints, **_):
        return select_uniform(scores, target_params=target_params, constraints=constraints)


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
        return [ratio_widths(s, r, c, prune_kv) for s in arch.layers]

    def hidden(r):
        return hidden_width(arch.hidden_size, r, c) if prune_hidden else arch.hidden_size

    if ratio is None:
        if target_params >= arch.num_params():
            return PrunePlan.identity(arch)
        ratio = bisect_fraction(lambda r: params_at(arch, widths(r), hidden(r)), target_params, "a uniform ratio")
    return plan_from_widths(scores, widths(ratio), hidden(ratio))
