"""Compaction at any TP/PP layout: an engine's state and the block-diagonal OBS Hessians, sliced
by a prune plan through their canonical form, one tensor at a time (collective over TP)."""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional

import torch

from megatron_effllm import layout
from megatron_effllm.architecture import Architecture
from megatron_effllm.parallel import comm
from megatron_effllm.layout import layer_of, layer_prefix
from megatron_effllm.pruning.groups import PrunePlan, PruningError, expand_units, tensor_axes
from megatron_effllm.pruning.surgery import slice_tensor


def _renamed(name: str, new_pos: Mapping[int, int], prefix: str) -> Optional[str]:
    """``name`` with its layer number (after ``prefix``) moved to the kept layer's new position;
    None when the layer is removed; unchanged for tensors outside the layers."""
    if not name.startswith(prefix):
        return name
    rest = name[len(prefix):]
    layer, tail = rest.split(".", 1)
    if int(layer) not in new_pos:
        return None
    return f"{prefix}{new_pos[int(layer)]}.{tail}"


def reshard_state(
    arch: Architecture,
    plan: PrunePlan,
    pairs: Iterable[tuple[str, dict]],
    *,
    fold=None,
) -> Iterator[tuple[str, dict]]:
    """Slice an engine's state for a compaction at any TP/PP size, one tensor at a time, lazily.

    ``pairs``: ``(megatron parameter name, {"param" | "exp_avg" | "exp_avg_sq": this TP rank's
    shard})`` in the module's order (full over data parallelism, as the engine's
    ``iter_full_state`` gives them); yields the same for the new architecture. For each tensor,
    the TP shards are all-gathered, mapped to canonical tensors, sliced by ``plan``, mapped to
    the new architecture's TP layout, and this rank's shard is kept: kept heads and FFN channels
    need not be balanced over the old shards (the global ranking may empty one rank's range more
    than another's), so the new shards take channels from any old one. The transient is one full
    tensor, not the model. ``fold(canonical dict) -> canonical dict`` transforms the gathered
    fp32 masters ("param") before slicing (L0 gate values). Pure data movement otherwise: at
    TP=1 the result is exactly the single-process slicing. Collective over the TP group: every
    rank consumes it with the same names in the same order. Under PP each stage slices its own
    layers (layer numbers local to the stage); removing layers would move layers between stages
    and is refused.
    """
    dims = comm.dims()
    if dims.pp != 1 and len(plan.kept_layers) != arch.num_layers:
        raise PruningError("removing layers under pipeline parallelism would move layers between stages; "
                           "set prune.allow_depth=false or parallel.pp=1")
    new_arch = plan.after
    axes = tensor_axes(arch)
    new_pos = {old: new for new, old in enumerate(plan.kept_layers)}
    for name, entry in pairs:
        new_name = _renamed(name, new_pos, "decoder.layers.")
        if new_name is None:  # a removed layer (the same on every rank: nothing to gather)
            continue
        new_entry = {}
        for key in sorted(entry):
            local = entry.pop(key)
            canon = layout.canonical_from_shards(arch, name, comm.all_gather(local, "tp"), dims.pp_rank, dims.pp)
            del local
            if fold is not None and key == "param":
                canon = fold(canon)
            sliced = {}
            for c, t in canon.items():
                l = layer_of(c)
                new_c = c if l is None else layer_prefix(new_pos[l]) + c[len(layer_prefix(l)):]
                sliced[new_c] = slice_tensor(t, axes[c], plan).contiguous()
            del canon
            new_entry[key] = layout.megatron_tensor(new_arch, new_name, sliced, dims)
        yield new_name, new_entry


def reshard_block_hessians(state: Mapping[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """``obs.HessianAccumulator`` state of row-parallel inputs (o_proj / down_proj columns held by
    this TP rank) after a compaction by ``plan``: the block-diagonal Hessian over the kept
    columns, cut along the new shards.

    Each rank holds X^T X of its own columns only (the block-diagonal approximation: a full-width
    Hessian would cost O(width^2) per rank and an all-gather of activations every step). The old
    blocks are all-gathered, laid on the diagonal, sliced by the kept columns and cut at the new
    shard boundaries: entries between columns that came from different old ranks are zero, as
    they were in the approximation. One layer's full matrix at a time. Collective over TP.
    """
    tp_rank, tp = comm.rank("tp"), comm.size("tp")
    axes = tensor_axes(plan.before)
    new_pos = {old: new for new, old in enumerate(plan.kept_layers)}
    out: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in state if k.startswith("xtx.")):
        name = key[4:]
        ax = axes[name][1]
        if ax.layer not in new_pos:
            continue
        blocks = comm.all_gather(state[key], "tp")
        full = torch.block_diag(*blocks)
        del blocks
        idx = expand_units(plan.kept(ax.kind, ax.layer), ax.unit).to(full.device)
        full = full.index_select(0, idx).index_select(1, idx)
        n = full.shape[0] // tp
        new = layer_prefix(new_pos[ax.layer]) + name[len(layer_prefix(ax.layer)):]
        out[f"xtx.{new}"] = full[tp_rank * n:(tp_rank + 1) * n, tp_rank * n:(tp_rank + 1) * n].clone()
        out[f"n.{new}"] = state[f"n.{name}"].clone()
    return out
