"""Per-layer sparsity (the ``adapt`` strategy's selector, Adapt-Pruner).

s_l <- clip(s_l + ds - A * I_hat_l, 0, 0.99) with layer importance I_l = -mean cos(x_in, x_out),
ds found by bisection to meet the parameter target; within a layer, heads and FFN channels go by
score. Layers are shaped only: hidden channels are never pruned here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_effllm.pruning.groups import PrunePlan, PruningError
from megatron_effllm.pruning.registry import SELECTORS
from megatron_effllm.pruning.saliency import GroupScores, normalise_importance
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
class Adaptive(Selector):
    name = "adaptive"
    description = "Adapt-Pruner layer-wise sparsity from block input/output cosine importance"
    needs_layer_importance = True

    def select(self, scores, target_params, constraints, *, layer_importance=None, adapt_step=0.02,
               adapt_steps=1):
        if layer_importance is None:
            raise PruningError("the adaptive selector needs layer importances (block input/output statistics)")
        plan, _ = select_adaptive(scores, layer_importance, target_params, steps=adapt_steps, A=adapt_step,
                                  constraints=constraints)
        return plan


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
    widths = [ratio_widths(shape, r, c, prune_kv) for shape, r in zip(arch.layers, s)]
    D = hidden_width(arch.hidden_size, hidden_ratio, c) if hidden_ratio > 0 else arch.hidden_size
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
        return params_at(arch, [ratio_widths(sh, r, c, prune_kv) for sh, r in zip(arch.layers, s)], arch.hidden_size)

    ds = bisect_fraction(params_of, target_params, "adaptive layer-wise sparsity") if target_params < arch.num_params() else 0.0
    s = run(ds)
    return select_layerwise(scores, s.tolist(), c, prune_kv=prune_kv), s
