"""Bytes one checkpoint writes, per rank and in total, as ``training.checkpoint.save`` writes it.

- the engine's model states: the module's weights in the training dtype, written by DP rank 0 of
  each model-parallel shard (ZeRO-3: every rank its partition);
- the engine's optimizer states: fp32 master and AdamW moments, each rank its 1/DP partition
  (ZeRO-0: DP rank 0 all of them);
- the pruning state: saliency sums and Hessians once on rank 0 at TP = PP = 1; with TP or PP > 1
  every rank also writes ``ranks/rank_N.pt``: its Hessians (fp32) and, during a compaction cycle,
  their cached inverses (fp64), which ``up_to`` counts.
"""
from __future__ import annotations

from megatron_effllm.planning.memory import ADAM_MOMENTS, FP32
from megatron_effllm.planning.ranks import Layout, Shard


def rank_checkpoint_bytes(cfg, sh: Shard, lay: Layout, dp_rank: int, pruning: dict) -> dict:
    b = 2 if cfg.model.dtype == "bf16" else 4
    zero = cfg.parallel.zero_stage
    part = -(-sh.params // lay.dp)
    master = FP32 if (zero > 0 or b != FP32) else 0
    out = {
        "model_states": (part * b if zero == 3 else (sh.params * b if dp_rank == 0 else 0)),
        "optimizer_states": (part * (ADAM_MOMENTS + master) if zero > 0
                             else (sh.params * (ADAM_MOMENTS + master) if dp_rank == 0 else 0)),
    }
    first_rank = dp_rank == 0 and sh.tp_rank == 0 and sh.pp_rank == 0
    rank_local = lay.tp > 1 or lay.pp > 1
    out["pruning_shared"] = pruning["saliency"] + (0 if rank_local else pruning["hessians"]) if first_rank else 0
    # fp32 Hessians and, up to, their fp64 inverses
    out["pruning_rank"] = 3 * pruning["hessians"] if rank_local else 0
    return out


def checkpoint_bytes(cfg, shards_memory: list, lay: Layout) -> dict:
    """``{"per_rank": [(rank, bytes by file kind)], "total": bytes, "largest_rank": bytes}`` over
    the whole world (each distinct shard's DP ranks counted by kind: rank 0 of DP and the rest)."""
    total, rows = 0, []
    for sh, mem in shards_memory:
        for dp_rank in (0, 1) if lay.dp > 1 else (0,):
            files = rank_checkpoint_bytes(cfg, sh, lay, dp_rank, mem.terms)
            copies = 1 if dp_rank == 0 else lay.dp - 1
            total += copies * sum(files.values())
            rows.append((lay.rank_of_shard(sh, dp_rank), files))
    rows.sort(key=lambda r: r[0])
    return {"per_rank": rows, "total": total, "largest_rank": max(sum(f.values()) for _, f in rows)}
