"""``taylor``: |sum_{i in g} w_i gbar_i|, first order, group-wise (LLM-Pruner "vectorize").

On a converged model the mean gradient is small and this signed sum is mostly noise that grows
like sqrt(group size) while the cost grows like the size: in a cost-normalised global ranking it
makes large groups (hidden channels, KV groups) look cheap. Measured one-shot on SmolLM2-135M at
50% of the parameters with OBS (``python tools/bench_oneshot.py``, BENCHMARKS.md), held-out
geo-mean perplexity: fisher 73.2, taylor_elem 105.2, taylor 17,016. Prefer ``fisher`` or
``taylor_elem`` for global selection.
"""
from megatron_effllm.pruning.estimators.base import GradientEstimator
from megatron_effllm.pruning.registry import ESTIMATORS


@ESTIMATORS.register
class Taylor(GradientEstimator):
    name = "taylor"
    description = "first-order Taylor, group-wise: abs(sum w*g) per group (noisy on a converged model)"
    needs = ("wg",)

    def combine(self, sums, count):
        return sums["wg"].abs() / count
