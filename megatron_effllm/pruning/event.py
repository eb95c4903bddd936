"""The steps of one prune event on canonical statistics, shared by the training runtime and the
one-shot path: choose the next groups from reduced scores through a selector, compose the plan
with what is already masked, agree on it, and OBS-compensate the columns it removes.

Communication is the caller's: the scores arrive reduced (``scores_of``), and ``agree`` is the
check that every rank holds the same plan (``parallel.distributed_pruning.check_same_decision``
in a run; nothing in one process).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_effllm.pruning.groups import PrunePlan, expand_units
from megatron_effllm.pruning.obs import downdate_inverse, remove_columns_
from megatron_effllm.pruning.saliency import GroupScores
from megatron_effllm.pruning.selection import Constraints
from megatron_effllm.pruning.selectors.base import Selector as RegisteredSelector

Selector = Callable[[GroupScores, int], PrunePlan]


def compose_plans(first: PrunePlan, second: PrunePlan) -> PrunePlan:
    """The plan doing ``first`` then ``second`` (made on ``first.after``), on ``first.before``."""
    layers = [first.kept_layers[l] for l in second.kept_layers]
    pos = {old: new for new, old in enumerate(first.kept_layers)}
    heads, kv, ffn = {}, {}, {}
    for l0 in layers:
        l1 = pos[l0]
        heads[l0] = first.heads[l0][second.heads[l1]]
        kv[l0] = first.kv[l0][second.kv[l1]]
        ffn[l0] = first.ffn[l0][second.ffn[l1]]
    return PrunePlan.build(first.before, layers, heads, kv, ffn, first.hidden[second.hidden])


def make_selector(selector: RegisteredSelector, constraints: Constraints, *,
                  layer_importance: Optional[Callable[[], torch.Tensor]] = None,
                  adapt_step: float = 0.02, adapt_steps: int = 1) -> Selector:
    """(scores, target) -> plan through a registered selector (``registry.SELECTORS``) under
    ``constraints``. ``layer_importance()`` is asked for only when selecting, and only by a
    selector that needs it (Adapt-Pruner): it may be collective. ``adapt_steps``: Adapt-Pruner
    updates per selection (one per prune event in training, several in a one-shot prune)."""
    if selector.needs_layer_importance and layer_importance is None:
        raise ValueError(f"the {selector.name} selector needs layer_importance")

    def select(scores: GroupScores, target: int) -> PrunePlan:
        importance = layer_importance() if selector.needs_layer_importance else None
        return selector.select(scores, target, constraints, layer_importance=importance, adapt_step=adapt_step,
                               adapt_steps=adapt_steps)

    return select


def next_plan(effective: PrunePlan, target: int, scores_of: Callable[[PrunePlan], GroupScores],
              select: Selector, agree: Callable[[PrunePlan], object] = lambda plan: None) -> Optional[PrunePlan]:
    """The plan (on ``effective.before``) that also removes the next groups needed to meet
    ``target``, or None when nothing is to go.

    ``effective``: what is masked already (the identity plan when nothing is); ``scores_of``
    gives the reduced scores of its still-present groups; ``agree`` runs on the composed plan
    before it is returned (every rank must have chosen the same before a weight changes).
    """
    if effective.after.num_params() <= target:
        return None
    plan = select(scores_of(effective), target)
    if plan.is_identity:
        return None
    total = compose_plans(effective, plan)
    agree(total)
    return total


@torch.no_grad()
def obs_compensate(W: torch.Tensor, Hinv: torch.Tensor, alive: list, gone: list, unit: int
                   ) -> tuple[torch.Tensor, list, torch.Tensor]:
    """OBS-remove the input-column units ``gone`` (a subset of ``alive``) of ``W`` in place.

    ``Hinv``: H^-1 over the columns of the ``alive`` units (in their order). The other alive
    columns absorb the removed ones; the removed ones become exactly zero. Returns (W, the
    units still alive, H^-1 downdated to their columns), so that the next removal in the same
    compaction cycle needs no new inverse.
    """
    pos = {u: i for i, u in enumerate(alive)}
    rm = expand_units([pos[u] for u in gone], unit)
    cols = expand_units(alive, unit)
    W_alive = W[:, cols].double()
    M = remove_columns_(W_alive, Hinv, rm)
    W[:, cols] = W_alive.to(W.dtype)
    removed = set(rm.tolist())
    keep = torch.tensor([i for i in range(len(alive) * unit) if i not in removed])
    gone_set = set(gone)
    return W, [u for u in alive if u not in gone_set], downdate_inverse(Hinv, rm, M, keep)
