"""The selector interface: scores + parameter target + constraints -> PrunePlan."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch

from megatron_effllm.pruning.groups import PrunePlan
from megatron_effllm.pruning.saliency import GroupScores
from megatron_effllm.pruning.selection import Constraints


class Selector:
    """One selector. Subclasses set the class attributes and implement ``select``."""

    name: ClassVar[str]
    description: ClassVar[str]
    # needs per-layer importance I_l = -mean cos(x_in, x_out) (block input/output statistics)
    needs_layer_importance: ClassVar[bool] = False

    def select(
        self,
        scores: GroupScores,
        target_params: int,
        constraints: Constraints,
        *,
        layer_importance: Optional[torch.Tensor] = None,
        adapt_step: float = 0.02,
        adapt_steps: int = 1,
    ) -> PrunePlan:
        """The plan meeting ``target_params`` (total parameters, embeddings included).

        ``adapt_step`` / ``adapt_steps``: Adapt-Pruner's A and the number of its updates (one per
        prune event in training; several at once in a one-shot prune), for selectors that use them.
        """
        raise NotImplementedError
