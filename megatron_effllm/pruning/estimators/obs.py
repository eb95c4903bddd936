"""``obs``: local OBS saliency of query heads (o_proj columns) and FFN channels (down_proj
columns), on the scale of the layer output's squared error (``obs.obs_group_scores``); KV
groups, hidden channels and layers are not scored."""
from __future__ import annotations

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning.estimators.base import Estimator, Statistics
from megatron_effllm.pruning.obs import obs_group_scores
from megatron_effllm.pruning.registry import ESTIMATORS
from megatron_effllm.pruning.saliency import GroupScores


@ESTIMATORS.register
class OptimalBrainSurgeon(Estimator):
    name = "obs"
    description = "local OBS: output error of removing a head / FFN channel (layer Hessians)"
    needs = ("weights", "hessians")

    def scores(self, stats: Statistics, arch: Architecture, weights: dict[str, torch.Tensor]) -> GroupScores:
        return obs_group_scores(weights, arch, self._require(stats, "hessians"))
