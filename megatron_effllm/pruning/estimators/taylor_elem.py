"""``taylor_elem``: sum_{i in g} |w_i g_i|, first order, element-wise (LLM-Pruner "param_first")."""
from megatron_effllm.pruning.estimators.base import GradientEstimator
from megatron_effllm.pruning.registry import ESTIMATORS


@ESTIMATORS.register
class TaylorElementwise(GradientEstimator):
    name = "taylor_elem"
    description = "first-order Taylor, element-wise: sum abs(w*g) per group"
    needs = ("awg",)

    def combine(self, sums, count):
        return sums["awg"] / count
