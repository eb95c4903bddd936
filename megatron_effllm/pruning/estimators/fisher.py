"""``fisher``: 1/2 sum_{i in g} w_i^2 F_ii, second order with the diagonal empirical Fisher
(LLM-Pruner "param_second"); the default (see ``taylor.py`` for why not first order)."""
from megatron_effllm.pruning.estimators.base import GradientEstimator
from megatron_effllm.pruning.registry import ESTIMATORS


@ESTIMATORS.register
class Fisher(GradientEstimator):
    name = "fisher"
    description = "diagonal empirical Fisher: 1/2 sum w^2 g^2 per group (the default)"
    needs = ("w2g2",)

    def combine(self, sums, count):
        return 0.5 * sums["w2g2"] / count
