"""A plan as text for people and as JSON for machines."""
from __future__ import annotations

import json

from megatron_effllm.planning.plan import GB, HEADROOM, Plan


def _gb(n: int) -> str:
    return f"{n / GB:,.2f} GB"


def to_dict(plan: Plan) -> dict:
    lay = plan.layout
    return {
        "config": plan.config, "overrides": plan.overrides,
        "architecture": {"from": plan.arch_from, "params": plan.arch.num_params(), "layers": plan.arch.num_layers},
        "layout": {"nodes": lay.nodes, "gpus_per_node": lay.gpus_per_node, "world": lay.world,
                   "dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "zero_stage": plan.cfg.parallel.zero_stage,
                   "grad_accum": plan.grad_accum, "gpu_mem_gb": plan.gpu_mem_gb},
        "ranks": [{"tp_rank": sh.tp_rank, "pp_rank": sh.pp_rank, "layers": [sh.layers.start, sh.layers.stop],
                   "first_rank": lay.rank_of_shard(sh), "params": sh.params,
                   "memory_bytes": dict(mem.terms), "activations_recompute_bytes": mem.activations_recompute,
                   "step_peak_bytes": mem.step_peak, "compaction_peak_bytes": mem.compaction_peak,
                   "compaction_host_bytes": mem.host_compaction, "peak_bytes": mem.peak}
                  for sh, mem in plan.memory],
        "checkpoint": {"total_bytes": plan.checkpoint["total"], "largest_rank_bytes": plan.checkpoint["largest_rank"],
                       "per_rank": [{"rank": r, **files} for r, files in plan.checkpoint["per_rank"]]},
        "deepspeed": plan.deepspeed,
        "launch": plan.launch,
        "refusal": plan.refusal(),
    }


def to_json(plan: Plan) -> str:
    return json.dumps(to_dict(plan), indent=1)


def to_text(plan: Plan) -> str:
    lay, cfg = plan.layout, plan.cfg
    out = [f"config {plan.config}" + (f" {' '.join(plan.overrides)}" if plan.overrides else ""),
           f"model: {plan.arch.num_params():,} parameters, {plan.arch.num_layers} layers ({plan.arch_from})",
           (f"layout: {lay.nodes} nodes x {lay.gpus_per_node} GPUs = {lay.world} ranks = DP {lay.dp} x TP {lay.tp} "
           f"x PP {lay.pp}; ZeRO-{cfg.parallel.zero_stage}, {cfg.model.dtype}; {plan.grad_accum} micro-batches of "
           f"{cfg.data.micro_batch} x {cfg.data.seq_len} tokens per rank and step"),
           "", "parameters per rank (the same on every DP rank of a shard):"]
    for sh, _ in plan.memory:
        out.append(f"  PP stage {sh.pp_rank} TP rank {sh.tp_rank}: layers {sh.layers.start}-{sh.layers.stop - 1}, "
                   f"{sh.params:,} parameters (first global rank {lay.rank_of_shard(sh)})")
    out += ["", f"memory per rank (GPU {plan.gpu_mem_gb:g} GB, plan limit {HEADROOM:.0%}):"]
    for sh, mem in plan.memory:
        terms = ", ".join(f"{k} {_gb(v)}" for k, v in mem.terms.items())
        out.append(f"  stage {sh.pp_rank} TP {sh.tp_rank}: {terms}")
        out.append(f"    activations with full recompute {_gb(mem.activations_recompute)}; step peak {_gb(mem.step_peak)}; "
                   f"compaction peak {_gb(mem.compaction_peak)} (+{_gb(mem.host_compaction)} parked on the host); "
                   f"peak {_gb(mem.peak)}")
    ck = plan.checkpoint
    out += ["", f"checkpoint: {_gb(ck['total'])} in total, at most {_gb(ck['largest_rank'])} written by one rank"]
    for rank, files in ck["per_rank"]:
        out.append(f"  rank {rank}: " + ", ".join(f"{k} {_gb(v)}" for k, v in files.items()))
    out += ["", "DeepSpeed config:", json.dumps(plan.deepspeed, indent=1), "", "launch:"]
    out += [f"  {name}: {line}" for name, line in plan.launch.items()]
    verdict = plan.refusal()
    out += ["", f"verdict: {verdict}" if verdict else f"verdict: fits ({_gb(plan.worst()[1].peak)} at the fullest rank)"]
    return "\n".join(out)
