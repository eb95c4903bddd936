"""Pruning strategies: the names users write (``prune.strategy``, ``--strategy``).

A strategy says which runtime the training loop builds for it (``saliency``: scores from the
training gradients and a selector; ``l0``: learned hard-concrete gates; ``none``: no pruning),
the selector it ranks with, and whether the one-shot tool runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_effllm.pruning.registry import STRATEGIES

RUNTIMES = ("saliency", "l0", "none")


@dataclass(frozen=True)
class Strategy:
    name: str
    runtime: str  # one of RUNTIMES
    selector: Optional[str]  # a name in registry.SELECTORS (saliency runtimes and one-shot)
    oneshot: bool  # effllm-prune-oneshot --strategy runs it
    description: str

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"strategy {self.name!r}: runtime {self.runtime!r} is not one of {RUNTIMES}")
        if (self.selector is None) != (self.runtime != "saliency"):
            raise ValueError(f"strategy {self.name!r}: a saliency strategy names a selector, the others none")


for _strategy in (
    Strategy("efficientllm", "saliency", "global", True,
             "saliency ranked globally by cost: per-layer widths design themselves (the default)"),
    Strategy("uniform", "saliency", "uniform", True,
             "the same fraction in every layer (Minitron / LLM-Pruner style)"),
    Strategy("adapt", "saliency", "adaptive", True,
             "Adapt-Pruner: layer-wise sparsity from block input/output cosine importance"),
    Strategy("sheared", "l0", None, False,
             "Sheared-LLaMA: learned L0 gates + Lagrangian to a uniform target shape (training only)"),
    Strategy("none", "none", None, False, "no pruning: plain continued pretraining"),
):
    STRATEGIES.register(_strategy)
