"""The schedule of a pruning run: which strategy, the target size, the size after each step,
when prune events fall, and the selector's constraints (shared by every runtime)."""
from __future__ import annotations

from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError
from megatron_effllm.pruning.latency import LatencyTable
from megatron_effllm.pruning.registry import STRATEGIES
from megatron_effllm.pruning.selection import Constraints
from megatron_effllm.training.schedules import target_params

class Schedule:
    """``cfg.prune`` read once: the target in parameters and the step -> target curve."""

    def __init__(self, cfg, arch: Architecture, source_params: int):
        p = cfg.prune
        self.strategy = STRATEGIES.get(p.strategy)  # a one-line error naming the registered ones
        self.cfg = cfg
        self.p = p
        self.enabled = self.strategy.runtime != "none"
        self.source_params = source_params
        embed = 0 if p.count_embeddings else arch.embedding_params()
        if p.target_params <= 1.0:
            self.target = int(round(p.target_params * (source_params - embed))) + embed
        else:
            self.target = int(p.target_params)
        if self.enabled and self.target >= source_params:
            raise UserError(
                f"prune.target_params {p.target_params:g} is not below the source size "
                f"({source_params:,} parameters); choose a smaller target"
            )
        # read once: every event (and every rank, from the same file) ranks with the same numbers
        self.latency = LatencyTable.load(p.latency_table) if p.cost == "latency" else None

    def target_at(self, step: int) -> int:
        p = self.p
        return target_params(step, source=self.source_params, target=self.target,
                             start=p.start_step, end=p.end_step, curve=p.curve)

    def event_due(self, step: int) -> bool:
        """A prune event after optimizer step ``step`` (1-based count of completed steps)."""
        if not self.enabled or step <= self.p.start_step:
            return False
        return (step - self.p.start_step) % self.p.interval == 0 or step == self.p.end_step

    def constraints(self) -> Constraints:
        return Constraints(
            tensor_parallel=self.cfg.parallel.tp,
            min_heads=max(1, self.p.min_heads_per_group),
            min_ffn=max(1, self.p.min_ffn),
            prune_hidden=self.p.prune_hidden,
            allow_depth=self.p.allow_depth,
            ffn_multiple=self.p.width_multiple.ffn,
            hidden_multiple=self.p.width_multiple.hidden,
            cost=self.p.cost,
            latency=self.latency,
        )
