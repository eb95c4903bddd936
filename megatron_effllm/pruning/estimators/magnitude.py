"""``magnitude``: sum of w^2 over each group's parameters (a KV group's own k/v rows, as for the
other estimators). Not on the loss scale: use it with the per-layer selectors, or rank only one
group kind globally with it."""
from __future__ import annotations

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning.estimators.base import Estimator, Statistics
from megatron_effllm.pruning.groups import tensor_axes
from megatron_effllm.pruning.registry import ESTIMATORS
from megatron_effllm.pruning.saliency import GroupScores, reduce_to_groups, scores_from, zero_vectors


@torch.no_grad()
def magnitude_scores(tensors: dict[str, torch.Tensor], arch: Architecture) -> GroupScores:
    """sum of w^2 over each group's parameters."""
    axes = tensor_axes(arch)
    out = zero_vectors(arch, "m", torch.float64, None)
    for name in axes:
        reduce_to_groups(axes, name, tensors[name].detach().to("cpu", torch.float64).square(), out, "m")
    return scores_from(arch, lambda k: out[f"m.{k}"])


@ESTIMATORS.register
class Magnitude(Estimator):
    name = "magnitude"
    description = "weight magnitude: sum w^2 per group (not on the loss scale)"
    needs = ("weights",)

    def scores(self, stats: Statistics, arch: Architecture, weights: dict[str, torch.Tensor]) -> GroupScores:
        return magnitude_scores(weights, arch)
