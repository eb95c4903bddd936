"""The saliency runtime's running statistics moved to another (DP, TP, PP) layout.

The per-rank files of a checkpoint (``Statistics.rank_state``, ``dp_shared_state``) are partial
sums whose meaning is layout-independent once reduced: the saliency vectors are canonical group
vectors summed over every rank (``reduce_saliency``), the layer cosines are summed over DP and
PP (and TP under sequence parallelism), and each OBS Hessian is the block of the o_proj /
down_proj input columns a TP rank holds, summed over DP. So every rank of the new layout reads
all old ranks' files and takes:

- the saliency sums over all old ranks, held by global rank 0 (zeros elsewhere: the reduction
  before a decision gives the same totals, up to the order of float additions);
- the layer cosines summed as they would be reduced, held where the new layout reduces them
  from (data-parallel rank 0 of the first stage; every TP rank unless the sums are split over TP);
- each Hessian's DP sum laid on the block diagonal at its old TP offset and cut at this rank's
  new column range (entries between columns of different old TP ranks are zero, as they were in
  the block-diagonal approximation; going to a larger TP drops the entries between the new
  blocks, as that approximation does), held by data-parallel rank 0, zeros on the others;
- the cached H^-1 of the current compaction cycle when TP is unchanged (it is per TP block);
  otherwise none, and the next prune event inverts the carried Hessians afresh.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_effllm import layout
from megatron_effllm.layout.dims import ParallelDims
from megatron_effllm.training.runtime.state import from_range

OldRank = tuple[ParallelDims, dict, Optional[dict]]  # (its dims, rank state, DP-shared state or None)


def _sum(values: list) -> torch.Tensor:
    out = values[0].clone()
    for v in values[1:]:
        out += v
    return out


def saliency_sums(old: list[OldRank], now: ParallelDims, global_rank: int) -> dict:
    """The saliency state of this rank: every old rank's sums added, on global rank 0 only."""
    total = {k: _sum([from_range(s["saliency"][k]) for _, s, _ in old]) for k in old[0][1]["saliency"]}
    return total if global_rank == 0 else {k: torch.zeros_like(v) for k, v in total.items()}


def layer_cos(old: list[OldRank], now: ParallelDims, split_over_tp: bool) -> torch.Tensor:
    total = _sum([s["layer_cos"] for d, s, _ in old if split_over_tp or d.tp_rank == 0])
    holds = now.dp_rank == 0 and now.pp_rank == 0 and (now.tp_rank == 0 or not split_over_tp)
    return total if holds else torch.zeros_like(total)


def hessians(old: list[OldRank], now: ParallelDims, num_layers: int) -> dict:
    """This rank's Hessian blocks (``xtx.NAME``, ``n.NAME``) for its stage's layers."""
    mine = set(layout.stage_layers(num_layers, now.pp, now.pp_rank))
    names = sorted({k[4:] for _, s, _ in old for k in s["hessians"] if k.startswith("xtx.")})
    out = {}
    for name in names:
        if layout.layer_of(name) not in mine:
            continue
        blocks: dict[int, torch.Tensor] = {}  # old TP rank -> its block summed over DP
        n = None
        for d, s, _ in sorted(old, key=lambda o: (o[0].tp_rank, o[0].dp_rank)):
            if f"xtx.{name}" not in s["hessians"]:
                continue
            x = s["hessians"][f"xtx.{name}"]
            blocks[d.tp_rank] = x.clone() if d.tp_rank not in blocks else blocks[d.tp_rank] + x
            if d.tp_rank == 0:  # every TP rank counts the same rows
                c = s["hessians"][f"n.{name}"]
                n = c.clone() if n is None else n + c
        size = next(iter(blocks.values())).shape[0]
        width = size * len(blocks)
        new_size = width // now.tp
        lo, hi = now.tp_rank * new_size, (now.tp_rank + 1) * new_size
        xtx = torch.zeros(new_size, new_size, dtype=blocks[0].dtype)
        for t, b in blocks.items():
            a, z = max(lo, t * size), min(hi, (t + 1) * size)
            if a < z:
                xtx[a - lo:z - lo, a - lo:z - lo] = b[a - t * size:z - t * size, a - t * size:z - t * size]
        if now.dp_rank != 0:
            xtx, n = torch.zeros_like(xtx), torch.zeros_like(n)
        out[f"xtx.{name}"], out[f"n.{name}"] = xtx, n
    return out


def obs_cache(old: list[OldRank], now: ParallelDims, num_layers: int) -> dict:
    """The cached H^-1 of this rank's TP block and stage, when TP is unchanged (else none)."""
    if old[0][0].tp != now.tp:
        return {}
    mine = set(layout.stage_layers(num_layers, now.pp, now.pp_rank))
    out = {}
    for d, _, shared in old:
        if shared is None or d.tp_rank != now.tp_rank:
            continue
        for name, entry in shared.get("obs_cache", {}).items():
            if layout.layer_of(name) in mine:
                out[name] = entry
    return out
