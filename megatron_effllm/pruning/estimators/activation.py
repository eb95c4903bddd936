"""``activation``: Minitron activation importance, mean |activation| at the o_proj input (per
head, the L2 norm of its slice), the down_proj input (per FFN channel) and the RMSNorm outputs
(per hidden channel); depth by 1 - cos(x_in, x_out). Not on the loss scale: use it with the
per-layer selectors. KV groups are not scored (heads are pruned within groups)."""
from __future__ import annotations

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning.estimators.base import Estimator, Statistics
from megatron_effllm.pruning.groups import PruningError
from megatron_effllm.pruning.registry import ESTIMATORS
from megatron_effllm.pruning.saliency import GroupScores


@ESTIMATORS.register
class Activation(Estimator):
    name = "activation"
    description = "Minitron: mean abs(activation) per head / FFN / hidden channel (calibration only)"
    needs = ("activations",)

    def scores(self, stats: Statistics, arch: Architecture, weights: dict[str, torch.Tensor]) -> GroupScores:
        acts = self._require(stats, "activations")
        state = acts.state
        n = float(state["tokens"])
        if n <= 0:
            raise PruningError("no activations recorded yet; run calibration batches first")
        L = range(acts.arch.num_layers)
        return GroupScores(
            acts.arch,
            heads=[state[f"act.head.{l}"] / n for l in L],
            kv=None,
            ffn=[state[f"act.ffn.{l}"] / n for l in L],
            hidden=state["act.hidden"] / n,
            layers=1.0 - acts.layer_cosine(),
        )
