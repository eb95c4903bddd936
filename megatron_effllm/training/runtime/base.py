"""What every pruning runtime keeps the same way: the schedule, the physical shape in the engine
and the masks over it, the event history, this rank's layout, and the compaction's slicing."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_effllm import layout
from megatron_effllm.architecture import Architecture
from megatron_effllm.layout.dims import ParallelDims
from megatron_effllm.parallel import comm
from megatron_effllm.parallel.reshard import reshard_state
from megatron_effllm.pruning.groups import PrunePlan
from megatron_effllm.pruning.surgery import full_masks, plan_from_masks
from megatron_effllm.training.runtime.schedule import Schedule


class RuntimeBase:
    """Shared state and the calls whose meaning does not depend on how groups are chosen."""

    RUNTIMES: tuple[str, ...] = ()  # the strategies' runtime kinds (pruning.strategies) the subclass runs
    waiting = False  # a prune event is waiting for statistics (the steps before it were skipped)

    def __init__(self, cfg, arch: Architecture, source_params: int):
        self.schedule = Schedule(cfg, arch, source_params)
        if self.schedule.strategy.runtime not in self.RUNTIMES:
            raise ValueError(f"{type(self).__name__} does not run prune.strategy {cfg.prune.strategy!r}; "
                             "build the runtime with make_runtime()")
        self._check_options(cfg.prune)
        self.cfg = cfg
        self.p = cfg.prune
        self.arch = arch  # physical shape of the model in the engine
        self.masks = full_masks(arch)
        self.events = 0
        self.history: list[dict] = []
        self.dims = ParallelDims()  # this rank's layout (set in install)
        self._model: Optional[torch.nn.Module] = None

    def _check_options(self, p) -> None:
        """Refuse options this runtime cannot run (before any other check of the target)."""

    # ------------------------------------------------------------------ schedule
    @property
    def enabled(self) -> bool:
        return self.schedule.enabled

    @property
    def target(self) -> int:
        return self.schedule.target

    @property
    def source_params(self) -> int:
        return self.schedule.source_params

    def target_at(self, step: int) -> int:
        return self.schedule.target_at(step)

    def collects(self, step: int) -> bool:
        """Whether step ``step`` (0-based) gathers pruning statistics: inside the window."""
        return self.enabled and self.p.start_step <= step < self.p.end_step

    def effective_plan(self) -> PrunePlan:
        return plan_from_masks(self.arch, self.masks)

    def effective_arch(self) -> Architecture:
        return self.effective_plan().after

    def current_params(self) -> int:
        """The model size the progress line shows: that of the masked model."""
        return self.effective_arch().num_params()

    # ------------------------------------------------------------------ the live model
    def _attach(self, model: torch.nn.Module) -> None:
        """Remember the live model and this rank's layout (the start of every ``install``)."""
        self.remove_hooks()
        self.dims = comm.dims()
        self._model = model

    def detach(self) -> None:
        """Let go of the live model (hooks and references), so that a compaction can free it."""
        self.remove_hooks()
        self._model = None

    def local_layers(self) -> range:
        """The model's layer numbers this pipeline stage holds."""
        return layout.stage_layers(self.arch.num_layers, self.dims.pp, self.dims.pp_rank)

    def global_layer(self, local: int) -> int:
        """The model's layer number of this pipeline stage's layer ``local``."""
        return self.local_layers()[local]

    # ------------------------------------------------------------------ compaction
    def compaction_plan(self) -> PrunePlan:
        return self.effective_plan()

    def _slicer(self, plan: PrunePlan, fold: Optional[Callable[[dict], dict]] = None):
        """The function the engine rebuild calls: this rank's megatron-named state -> sliced.

        Any TP size: each tensor is gathered over TP, sliced in canonical form and re-sharded for
        the new shape, one tensor at a time (``parallel.reshard.reshard_state``); ``fold``
        transforms the canonical fp32 masters first."""
        arch = self.arch

        def fn(pairs):
            return reshard_state(arch, plan, pairs, fold=fold)

        return fn

    def _reset_shape(self, plan: PrunePlan) -> None:
        """After a compaction: the engine holds ``plan.after``, nothing is masked."""
        self.arch = plan.after
        self.masks = full_masks(self.arch)

    def _common_state(self) -> dict:
        return {"arch": self.arch.to_dict(), "masks": {k: v.clone() for k, v in self.masks.items()},
                "events": self.events, "history": list(self.history)}

    def _load_common_state(self, state: dict) -> None:
        self.arch = Architecture.from_dict(state["arch"])
        self.masks = {k: v.clone() for k, v in state["masks"].items()}
        self.events = state["events"]
        self.history = list(state["history"])
