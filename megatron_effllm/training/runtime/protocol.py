"""What the Trainer (and the fault handling) calls on a pruning runtime. Two implementations:
``SaliencyRuntime`` (scores, masks, OBS; efficientllm / uniform / adapt / none) and
``L0Runtime`` (learned gates; sheared), built by ``factory.make_runtime``."""
from __future__ import annotations

from typing import Any, ContextManager, Optional, Protocol


from megatron_effllm.architecture import Architecture
from megatron_effllm.engine.base import TrainEngine
from megatron_effllm.pruning.groups import PrunePlan


class PruningRuntime(Protocol):
    cfg: Any
    p: Any  # cfg.prune
    arch: Architecture  # the physical shape of the model in the engine
    enabled: bool
    target: int  # the final size in parameters
    waiting: bool  # a prune event waits for statistics (every step since the window opened was skipped)

    # --- the live model ----------------------------------------------------------------
    def install(self, engine: TrainEngine) -> None:
        """Put the hooks on the engine's module (again after every compaction or resume)."""

    def remove_hooks(self) -> None: ...

    def detach(self) -> None:
        """Drop the hooks and every reference to the live model (before a compaction frees it)."""

    # --- one optimizer step ------------------------------------------------------------
    def start_step(self, collecting: bool, samples_per_rank: float, grad_scale: float,
                   step: Optional[int] = None) -> None:
        """Before the step's micro-batches; ``collecting``: inside the pruning window."""

    def end_micro_batch(self, samples: float) -> None: ...

    def extra_grad_leaves(self) -> list:
        """Leaves outside the model whose ``.grad`` the step's backward fills (L0 gates)."""

    def paused(self) -> ContextManager:
        """A context in which the gradient hooks record nothing (the pipeline's hand-over)."""

    def before_micro_batch_backward(self, batch: dict) -> None: ...

    def end_pipeline_schedule(self) -> None: ...

    def end_step(self, skipped) -> None:
        """After the engine's step: keep what the step added to the running statistics, or put
        back those before it when ``skipped`` (a device flag); decided on the device."""

    def discard_step(self) -> None:
        """The step's update was skipped (known on the host, before the next prune event):
        forget what it would have applied."""

    def step_metrics(self, step: int) -> dict:
        """Extra fields for the step's ``train`` record."""

    def current_params(self) -> int:
        """The model size the progress line shows."""

    # --- prune events and compaction -----------------------------------------------------
    def collects(self, step: int) -> bool:
        """Whether step ``step`` (0-based) gathers statistics (the ``collecting`` of start_step)."""

    def event_due(self, step: int) -> bool: ...

    def prune_event(self, engine, step: int) -> Optional[dict]:
        """The event after optimizer step ``step``; a record for the metrics, or None."""

    def compaction_due(self, step: int) -> bool: ...

    def compaction_plan(self) -> PrunePlan: ...

    def slice_engine_state(self, plan: PrunePlan):
        """The function the engine rebuild calls: this rank's megatron-named state -> sliced."""

    def after_compaction(self, plan: PrunePlan) -> None: ...

    def effective_plan(self) -> PrunePlan: ...

    def effective_arch(self) -> Architecture: ...

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def rank_state_dict(self) -> Optional[dict]:
        """This rank's own state when ranks differ (None otherwise): saved by every rank as it is,
        so that saving changes nothing and a resume continues it bit for bit."""

    def dp_shared_state_dict(self) -> Optional[dict]:
        """State every data-parallel rank of this rank's model shard holds identically (None if
        none): saved once, by DP rank 0, and loaded by all of them."""

    def load_rank_state_dict(self, state: Optional[dict], dp_shared: Optional[dict] = None) -> None: ...

    def load_other_layout(self, old: list) -> None:
        """This rank's running statistics from a checkpoint written at another layout: ``old`` is
        every old rank's ``(ParallelDims, rank_state_dict, dp_shared_state_dict)``."""
