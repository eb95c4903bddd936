"""Bytes one checkpoint writes, per rank and in total, as ``training.checkpoint.save`` writes it.

- the engine's model states: the module's weights in the training dtype, written by DP rank 0 of
  each model-parallel shard (ZeRO-3: every rank its partition);
- the engine's optimizer states: fp32 master and AdamW moments, each rank its 1/DP partition
  (ZeRO-0: DP rank 0 all of them);
- ``ranks/rank_N.pt``, every rank: its own running sums as they are: the saliency vectors over
  the range where they are not zero (its TP slice of the heads and channels, its stage's layers),
  the block cosines and its fp32 Hessians (partial sums over DP);
- ``ranks/shared_rank_N.pt``, DP rank 0 of each shard: the cached fp64 H^-1 of its Hessians,
  during a compaction cycle (``up_to``: at most the full inverses).
"""
from __future__ import annotations

from megatron_effllm.architecture import Architecture
from megatron_effllm.planning.memory import ADAM_MOMENTS, FP32
from megatron_effllm.planning.ranks import Layout, Shard
from megatron_effllm.pruning.saliency import GradSaliency

FP64 = 8


def saliency_file_bytes(cfg, arch: Architecture, sh: Shard, tp: int) -> int:
    """The saliency vectors a rank writes: its TP slice of each of its layers' head, kv and ffn
    vectors, its stage's part of the layer vector, the hidden vector whole; and the block cosines."""
    if cfg.prune.strategy == "none":
        return 0
    sal = GradSaliency(arch, estimators=(cfg.prune.estimator,), device="meta")
    out = arch.num_layers * 2 * FP64  # block cosines, [layers, 2]
    for key, v in sal.state.items():
        kind = key.split(".")[1] if "." in key else key
        if kind in ("head", "kv", "ffn"):
            out += v.numel() // tp * FP64 if int(key.rsplit(".", 1)[1]) in sh.layers else 0
        elif kind == "layer":
            out += len(sh.layers) * FP64
        else:  # hidden (fed on every rank), the count
            out += v.numel() * FP64
    return out


def rank_checkpoint_bytes(cfg, arch: Architecture, sh: Shard, lay: Layout, dp_rank: int, pruning: dict) -> dict:
    b = 2 if cfg.model.dtype == "bf16" else 4
    zero = cfg.parallel.zero_stage
    part = -(-sh.params // lay.dp)
    master = FP32 if (zero > 0 or b != FP32) else 0
    return {
        "model_states": (part * b if zero == 3 else (sh.params * b if dp_rank == 0 else 0)),
        "optimizer_states": (part * (ADAM_MOMENTS + master) if zero > 0
                             else (sh.params * (ADAM_MOMENTS + master) if dp_rank == 0 else 0)),
        "pruning_rank": saliency_file_bytes(cfg, arch, sh, lay.tp) + pruning["hessians"],
        # fp64 inverses of the fp32 Hessians, once per shard
        "pruning_dp_shared": 2 * pruning["hessians"] if dp_rank == 0 else 0,
    }


def checkpoint_bytes(cfg, arch: Architecture, shards_memory: list, lay: Layout) -> dict:
    """``{"per_rank": [(rank, bytes by file kind)], "total": bytes, "largest_rank": bytes}`` over
    the whole world (each distinct shard's DP ranks counted by kind: rank 0 of DP and the rest)."""
    total, rows = 0, []
    for sh, mem in shards_memory:
        for dp_rank in (0, 1) if lay.dp > 1 else (0,):
            files = rank_checkpoint_bytes(cfg, arch, sh, lay, dp_rank, mem.terms)
            copies = 1 if dp_rank == 0 else lay.dp - 1
            total += copies * sum(files.values())
            rows.append((lay.rank_of_shard(sh, dp_rank), files))
    rows.sort(key=lambda r: r[0])
    return {"per_rank": rows, "total": total, "largest_rank": max(sum(f.values()) for _, f in rows)}
