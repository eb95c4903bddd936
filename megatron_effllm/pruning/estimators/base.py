"""What an estimator is: a name, what it needs, and how it turns statistics into GroupScores.

Modelled on Torch-Pruning's injectable ``Importance`` classes: the pruning pipeline never tests
an estimator's name; it asks the registered object what to collect (``needs``) and for scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning.groups import PruningError
from megatron_effllm.pruning.obs import HessianAccumulator
from megatron_effllm.pruning.saliency import GRAD_QUANTITIES, ActivationSaliency, GradSaliency, GroupScores

# What an estimator may need: the gradient sums of GRAD_QUANTITIES ("wg", "awg", "w2g2"),
# activation statistics, the weights themselves, or the layer-input Hessians (second order).
NEEDS = (*GRAD_QUANTITIES, "activations", "weights", "hessians")


@dataclass
class Statistics:
    """What a calibration pass (or the training steps) accumulated; None where not collected."""

    grads: Optional[GradSaliency] = None
    activations: Optional[ActivationSaliency] = None
    hessians: Optional[HessianAccumulator] = None


class Estimator:
    """One saliency estimator. Subclasses set the class attributes and implement ``scores``."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, for the README table and command-line help
    needs: ClassVar[tuple[str, ...]]  # a subset of NEEDS
    in_training: ClassVar[bool] = False  # usable by the training loop (prune.estimator)

    def __init__(self):
        bad = [n for n in self.needs if n not in NEEDS]
        if bad:
            raise ValueError(f"estimator {self.name!r} needs unknown statistics {bad}; known: {NEEDS}")

    @property
    def gradient(self) -> bool:
        """Scores from gradient sums (``GradSaliency``)."""
        return any(n in GRAD_QUANTITIES for n in self.needs)

    def scores(self, stats: Statistics, arch: Architecture, weights: dict[str, torch.Tensor]) -> GroupScores:
        raise NotImplementedError

    def _require(self, stats: Statistics, field: str):
        value = getattr(stats, field)
        if value is None:
            raise PruningError(f"estimator {self.name!r} needs {field} statistics; collect them for it")
        return value


class GradientEstimator(Estimator):
    """Scores from ``GradSaliency``'s per-group sums: ``combine`` maps them to one group's scores.

    These estimate the increase of the (mean) training loss when a group is set to zero,
    Delta w = -w:   Delta L ~= -sum_g w*g  +  1/2 sum_g w^2 F   (F = diagonal empirical Fisher).
    """

    in_training = True

    def combine(self, sums: dict[str, torch.Tensor], count: float) -> torch.Tensor:
        """Scores of one group vector from the sums of ``needs`` over ``count`` samples."""
        raise NotImplementedError

    def scores(self, stats: Statistics, arch: Architecture, weights: dict[str, torch.Tensor]) -> GroupScores:
        return self._require(stats, "grads").scores(self.name)
