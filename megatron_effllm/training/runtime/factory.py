"""The pruning runtime of a run's configuration."""
from __future__ import annotations

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning.registry import STRATEGIES
from megatron_effllm.training.runtime.l0_runtime import L0Runtime
from megatron_effllm.training.runtime.protocol import PruningRuntime
from megatron_effllm.training.runtime.saliency_runtime import SaliencyRuntime


def make_runtime(cfg, arch: Architecture, source_params: int) -> PruningRuntime:
    """Learned L0 gates for prune.strategy=sheared, saliency for the others."""
    if STRATEGIES.get(cfg.prune.strategy).runtime == "l0":
        return L0Runtime(cfg, arch, source_params)
    return SaliencyRuntime(cfg, arch, source_params)
