"""The megatron layout map seen from one rank's ``ParallelDims``: every call the pruning adapter
makes into ``convert.megatron_layout`` goes through these few functions (so a change of that
map's signatures changes only this module)."""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.convert import megatron_layout as layout
from megatron_effllm.layout.dims import ParallelDims

LOCAL = layout.LOCAL


def stage_layers(arch: Architecture, dims: ParallelDims) -> range:
    """The model's layer numbers this pipeline stage holds."""
    return layout.stage_layers(arch.num_layers, dims.pp, dims.pp_rank)


def pieces(arch: Architecture, name: str, t: torch.Tensor, dims: ParallelDims,
           check: bool = True) -> dict[str, tuple[torch.Tensor, dict[int, int]]]:
    """``{canonical name: (piece, {dim: start})}`` of megatron tensor ``name`` of this shard
    (``_extra_state`` keys give nothing)."""
    if layout.is_extra_state(name):
        return {}
    return layout.canonical_pieces(arch, name, t, dims.tp_rank, dims.tp, dims.pp_rank, dims.pp, check=check)


def megatron_tensors(arch: Architecture, canonical: Callable[[str], torch.Tensor], dims: ParallelDims,
                     style: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, this shard's tensor) for every tensor, from canonical tensors made on demand."""
    return layout.iter_megatron(arch, canonical, dims.tp_rank, dims.tp, dims.pp_rank, dims.pp, style)


def canonical_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    return layout.canonical_shapes(arch)


def canonical_from_shards(arch: Architecture, name: str, tp_shards: Sequence[torch.Tensor],
                          dims: ParallelDims) -> dict[str, torch.Tensor]:
    """The canonical tensors megatron tensor ``name`` holds, from its shards of every TP rank."""
    return layout.canonical_from_shards(arch, name, tp_shards, dims.pp_rank, dims.pp)


def megatron_tensor(arch: Architecture, name: str, canonical: Mapping[str, torch.Tensor],
                    dims: ParallelDims) -> torch.Tensor:
    """This shard's megatron tensor ``name`` from the canonical tensors it is made of."""
    return layout.megatron_tensor(arch, name, canonical, dims.tp_rank, dims.tp, dims.pp_rank, dims.pp)
