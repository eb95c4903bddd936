"""The capacity plan of a run: its config and parallel layout resolved, per rank parameters,
memory and checkpoint bytes, the engine's DeepSpeed JSON and the launch command lines.

    plan = make_plan("configs/qwen2_5_1_5b_to_0_5b.yaml", nodes=2, gpus_per_node=8, gpu_mem_gb=80)
    plan.refusal()  # None, or the one line that says why it does not fit and what to change
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_effllm.architecture import Architecture
from megatron_effllm.engine.deepspeed_engine import deepspeed_config
from megatron_effllm.errors import UserError
from megatron_effllm.planning.arch import plan_architecture
from megatron_effllm.planning.checkpoint_bytes import checkpoint_bytes
from megatron_effllm.planning.launch import launch_commands
from megatron_effllm.planning.memory import Memory, rank_memory
from megatron_effllm.planning.ranks import Layout, Shard, make_layout, shards
from megatron_effllm.training.config import RunConfig, load_config
from megatron_effllm.training.trainer import check_pipeline, engine_options, grad_accumulation

HEADROOM = 0.9  # the share of a GPU's memory a plan may fill (allocator caches, CUDA context)
GB = 10**9

# What to change when a term is the largest, by term.
FIXES = {
    "weights": "more tensor/pipeline parallelism (parallel.tp, parallel.pp) or parallel.zero_stage=3",
    "gradients": "parallel.zero_stage=2 or more tensor/pipeline parallelism (parallel.tp, parallel.pp)",
    "optimizer": "a higher parallel.zero_stage or more nodes (the optimizer state is split over data-parallel ranks)",
    "zero_buckets": "parallel.zero_stage=1 (ZeRO-2's reduce bucket is allocated whole)",
    "activations": "activation recompute (model.recompute=full), a smaller data.micro_batch or more tensor/pipeline parallelism",
    "logits": "a smaller data.micro_batch or more tensor parallelism (parallel.tp splits the vocabulary)",
    "saliency": "more pipeline parallelism or fewer prunable groups",
    "hessians": "prune.obs=false or more tensor parallelism (parallel.tp splits the Hessians)",
    "masks": "more tensor/pipeline parallelism (parallel.tp, parallel.pp)",
    "compaction": "a higher parallel.zero_stage or more tensor/pipeline parallelism",
    "teacher": "more tensor parallelism (the teacher is split like the student) or distill.alpha=0",
}


@dataclass
class Plan:
    config: str
    overrides: list
    cfg: RunConfig
    arch: Architecture
    arch_from: str
    layout: Layout
    grad_accum: int
    gpu_mem_gb: float
    memory: list  # (Shard, Memory) per distinct (tp_rank, pp_rank)
    checkpoint: dict
    deepspeed: dict
    launch: dict

    def params_of_rank(self, rank: int) -> int:
        dims = self.layout.dims_of(rank)
        return self.shard_of(dims.tp_rank, dims.pp_rank)[0].params

    def shard_of(self, tp_rank: int, pp_rank: int) -> tuple[Shard, Memory]:
        return self.memory[pp_rank * self.layout.tp + tp_rank]

    def worst(self) -> tuple[Shard, Memory]:
        return max(self.memory, key=lambda sm: sm[1].peak)

    def refusal(self) -> Optional[str]:
        """None when every rank's peak fits in HEADROOM of the GPU, else one line naming the
        largest term of the fullest rank and what to change."""
        sh, mem = self.worst()
        limit = HEADROOM * self.gpu_mem_gb * GB
        if mem.peak <= limit:
            return None
        name, size = mem.largest()
        return (f"does not fit: rank {self.layout.rank_of_shard(sh)} (TP {sh.tp_rank}, PP stage {sh.pp_rank}) "
                f"needs {mem.peak / GB:.1f} GB at its peak, over {HEADROOM:.0%} of gpu_mem_gb={self.gpu_mem_gb:g} "
                f"({limit / GB:.1f} GB); the largest term is {name} ({size / GB:.1f} GB): use {FIXES[name]}")


def make_plan(config: str, nodes: int, gpus_per_node: int, gpu_mem_gb: float,
              overrides: Optional[list] = None) -> Plan:
    overrides = list(overrides or [])
    if not gpu_mem_gb > 0:
        raise UserError(f"gpu_mem_gb={gpu_mem_gb} must be a positive number of GB (e.g. 80 for an H100 80GB)")
    cfg = load_config(config, overrides)
    check_pipeline(cfg)
    arch, arch_from = plan_architecture(cfg.model)
    lay = make_layout(nodes, gpus_per_node, cfg.parallel.tp, cfg.parallel.pp, arch)
    grad_accum = grad_accumulation(cfg, lay.dp)
    memory = [(sh, rank_memory(cfg, arch, sh, lay, grad_accum)) for sh in shards(arch, lay)]
    return Plan(config, overrides, cfg, arch, arch_from, lay, grad_accum, gpu_mem_gb, memory,
                checkpoint_bytes(cfg, arch, memory, lay), deepspeed_config(engine_options(cfg, grad_accum)),
                launch_commands(config, overrides, lay))
