"""The parallel layout of a world of ranks and what each model-parallel shard holds.

World = nodes x gpus_per_node = DP x TP x PP. Global ranks follow megatron-core's default order
(``tp-cp-ep-dp-pp``: TP varies fastest, then DP, then PP), so rank r is
``tp_rank + TP * (dp_rank + DP * pp_rank)``. Shapes come from ``layout.megatron_shapes``: the
same table the model builder and converters use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_effllm import layout
from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError
from megatron_effllm.layout import ParallelDims


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def dims_of(self, rank: int) -> ParallelDims:
        """The (TP, PP, DP) place of global rank ``rank``."""
        if not 0 <= rank < self.world:
            raise UserError(f"rank {rank} is outside the world of {self.world} ranks")
        tp_rank, rest = rank % self.tp, rank // self.tp
        return ParallelDims(tp_rank, self.tp, rest // self.dp, self.pp, rest % self.dp, self.dp)

    def rank_of(self, dims: ParallelDims) -> int:
        return dims.tp_rank + self.tp * (dims.dp_rank + self.dp * dims.pp_rank)

    def rank_of_shard(self, sh: Shard, dp_rank: int = 0) -> int:
        return self.rank_of(ParallelDims(sh.tp_rank, self.tp, sh.pp_rank, self.pp, dp_rank, self.dp))


def make_layout(nodes: int, gpus_per_node: int, tp: int, pp: int, arch: Architecture) -> Layout:
    """The layout, or a UserError naming what does not divide."""
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if value < 1:
            raise UserError(f"{name}={value} must be a positive integer")
    world = nodes * gpus_per_node
    if world % (tp * pp):
        raise UserError(f"world {nodes} x {gpus_per_node} = {world} ranks is not divisible by "
                        f"parallel.tp x parallel.pp = {tp} x {pp}; change the node count or TP/PP")
    arch.validate(tensor_parallel=tp)
    if arch.vocab_size % tp:
        raise UserError(f"vocab size {arch.vocab_size} is not divisible by parallel.tp={tp}; "
                        "choose a TP size that divides the vocabulary")
    layout.stage_layer_counts(arch.num_layers, pp)  # a UserError when pp exceeds the layers
    return Layout(nodes, gpus_per_node, tp, pp)


@dataclass(frozen=True)
class Shard:
    """What one (tp_rank, pp_rank) model-parallel shard holds (the same on every DP rank)."""

    tp_rank: int
    pp_rank: int
    layers: range
    params: int  # parameter elements on the rank
    largest: int  # elements of its largest tensor
    row_inputs: tuple[int, ...]  # input widths of its row-parallel linears (the OBS Hessian sites)


def shard(arch: Architecture, dims: ParallelDims) -> Shard:
    shapes = layout.megatron_shapes(arch, dims)
    sizes = [math.prod(s) for s in shapes.values()]
    row_inputs = tuple(s[1] for n, s in shapes.items()
                       if n.endswith(("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")))
    return Shard(dims.tp_rank, dims.pp_rank, layout.stage_layers(arch.num_layers, dims.pp, dims.pp_rank),
                 sum(sizes), max(sizes), row_inputs)


def shards(arch: Architecture, lay: Layout) -> list[Shard]:
    """Every distinct shard, stage by stage (TP ranks within a stage)."""
    return [shard(arch, ParallelDims(t, lay.tp, p, lay.pp)) for p in range(lay.pp) for t in range(lay.tp)]
