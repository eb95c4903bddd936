"""``mix``: |sum w gbar - 1/2 sum w^2 F|, first minus half the second order, group-wise
(LLM-Pruner "param_mix")."""
from megatron_effllm.pruning.estimators.base import GradientEstimator
from megatron_effllm.pruning.registry import ESTIMATORS


@ESTIMATORS.register
class Mix(GradientEstimator):
    name = "mix"
    description = "first minus half the second order: abs(sum w*g - 1/2 sum w^2 g^2) per group"
    needs = ("wg", "w2g2")

    def combine(self, sums, count):
        return (sums["wg"] - 0.5 * sums["w2g2"]).abs() / count
