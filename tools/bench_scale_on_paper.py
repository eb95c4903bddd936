#!/usr/bin/env python
"""Communication of pruning at cluster scale, on paper: saliency and OBS-Hessian traffic per prune
event against the gradient traffic of one training step, from the code's own group counts.

    python tools/bench_scale_on_paper.py [--model llama3-8b] [--tp 8] [--pp 2] [--dp 64]
        [--estimator taylor] [--grad-bytes 4] [--benchmarks-md BENCHMARKS.md]

Nothing is run on a cluster: the script builds the model's ``Architecture``, instantiates the
saliency accumulator (``GradSaliency``) that a training run keeps and counts what
``parallel/distributed_pruning.reduce_saliency`` sends at a prune event: the whole model's
zero-padded score vectors (each rank fills its own layers, heads, KV groups, FFN channels and its
partial hidden sums), all-reduced as one flat message over the TP, then the PP, then the DP group;
and the OBS layer Hessians (X^T X of the o_proj / down_proj inputs, of which a row-parallel rank
holds its own 1/TP of the columns) that are reduced over DP once per compaction. The gradient
all-reduce of one step is that of the rank's parameter shard over the data-parallel group. Bytes
are what a ring all-reduce sends per rank: 2 (n - 1) / n x payload.

One thing is measured on this machine: the time and memory one rank (TP rank 0, PP stage 0) spends
building its weight masks at a prune event (``distributed_pruning.local_weight_masks``) for a
mid-run mask (10% of every FFN, one KV group of layer 0 and 1% of the hidden channels masked).
"""
import argparse
import resource
import time

from megatron_effllm.errors import UserError, cli_entry
from megatron_effllm.pruning.registry import ESTIMATORS

MODELS = {  # Architecture.uniform fields of the published configs
    "llama3-8b": dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_groups=8, ffn_hidden_size=14336,
                      vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, num_heads=32, num_kv_groups=8, ffn_hidden_size=8192,
                        vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "smollm2-135m": dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_groups=3, ffn_hidden_size=1536,
                         vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
}


def ring_bytes(payload_bytes: float, n: int) -> float:
    return 2.0 * (n - 1) / n * payload_bytes if n > 1 else 0.0


def measure_mask_build(arch, tp: int, pp: int) -> dict:
    """Seconds, peak-memory growth (bytes) and masked entries of one rank's prune-event masks."""
    import torch

    from megatron_effllm.layout.dims import ParallelDims
    from megatron_effllm.parallel.distributed_pruning import local_weight_masks
    from megatron_effllm.pruning.surgery import full_masks

    masks = full_masks(arch)
    g = torch.Generator().manual_seed(0)
    for l, shape in enumerate(arch.layers):
        masks[f"ffn.{l}"][torch.randperm(shape.ffn_hidden_size, generator=g)[: shape.ffn_hidden_size // 10]] = 0
    masks["kv.0"][0] = 0
    masks["hidden"][torch.randperm(arch.hidden_size, generator=g)[: arch.hidden_size // 100]] = 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    local = local_weight_masks(arch, masks, ParallelDims(0, tp, 0, pp))
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024
    return {"seconds": seconds, "peak_growth": grown, "entries": sum(m.numel() for m in local.values()),
            "tensors": len(local)}


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=64)
    ap.add_argument("--estimator", default="taylor", choices=ESTIMATORS.names(in_training=True))
    ap.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient element in the all-reduce (fp32: 4, bf16: 2)")
    ap.add_argument("--stat-bytes", type=int, default=8, help="bytes per saliency entry (the accumulators are fp64)")
    ap.add_argument("--hessian-bytes", type=int, default=4, help="bytes per Hessian entry (fp32)")
    ap.add_argument("--compact-every", type=int, default=10, help="prune events per compaction (OBS Hessian reduce)")
    ap.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    args = ap.parse_args(argv)
    from megatron_effllm.architecture import Architecture
    from megatron_effllm.eval.report import append_section, command_line
    from megatron_effllm.pruning.saliency import GradSaliency

    arch = Architecture.uniform(**MODELS[args.model])
    try:
        arch.validate(tensor_parallel=args.tp)
    except Exception as err:
        raise UserError(f"{args.model} at TP={args.tp}: {err}") from None
    if arch.num_layers % args.pp:
        raise UserError(f"--pp {args.pp} does not divide the {arch.num_layers} layers")
    sal = GradSaliency(arch, estimators=(args.estimator,))
    entries = sum(v.numel() for v in sal.state.values())  # one flat message, the whole model
    layers_per_stage = arch.num_layers // args.pp
    s = arch.layers[0]
    # OBS Hessians of one rank: o_proj input (its heads x head_dim) and down_proj input (its FFN share)
    hess = layers_per_stage * ((s.num_heads * arch.head_dim // args.tp) ** 2 + (s.ffn_hidden_size // args.tp) ** 2)
    params_per_rank = arch.num_params() / (args.tp * args.pp)  # embeddings and norms included, roughly
    grad_step = ring_bytes(params_per_rank * args.grad_bytes, args.dp)
    payload = entries * args.stat_bytes
    sal_mp = ring_bytes(payload, args.tp) + ring_bytes(payload, args.pp)
    sal_dp = ring_bytes(payload, args.dp)
    hess_compaction = ring_bytes(hess * args.hessian_bytes, args.dp)
    rows = [
        ("gradient all-reduce of one training step (DP)", grad_step),
        ("score all-reduce over TP and PP per prune event", sal_mp),
        ("score all-reduce over DP per prune event", sal_dp),
        (f"OBS Hessian all-reduce per compaction (DP), every {args.compact_every} events", hess_compaction),
        ("pruning traffic per event, Hessians amortised", sal_mp + sal_dp + hess_compaction / args.compact_every),
    ]
    table = "| what, per rank | bytes sent | vs. one step's gradient all-reduce |\n|---|---|---|\n"
    for name, b in rows:
        table += f"| {name} | {b / 1e6:,.3f} MB | {b / grad_step:.2e} |\n"
    notes = (f"{args.model}: {arch.num_params() / 1e9:.2f}B parameters, {arch.num_layers} layers, hidden "
             f"{arch.hidden_size}, {s.num_heads} heads / {s.num_kv_groups} KV groups, FFN {s.ffn_hidden_size}; "
             f"TP={args.tp}, PP={args.pp}, DP={args.dp} ({args.tp * args.pp * args.dp} ranks). Estimator "
             f"`{args.estimator}`: the accumulator holds {entries:,} entries for the whole model "
             f"({args.stat_bytes} bytes each, fp64), reduced as one message; the rank's gradient "
             f"shard is {params_per_rank / 1e6:,.0f}M elements ({args.grad_bytes} bytes each); its OBS Hessians "
             f"{hess / 1e6:,.1f}M entries. Ring all-reduce: 2 (n-1)/n x payload per rank.")
    built = measure_mask_build(arch, args.tp, args.pp)
    notes += (f" Measured here: rank (TP 0, PP 0) builds its prune-event weight masks (10% of every FFN, "
              f"one KV group, 1% of the hidden channels masked) in {built['seconds']:.2f} s, peak memory "
              f"+{built['peak_growth'] / 2**30:.2f} GiB: {built['tensors']} tensors, "
              f"{built['entries'] / 1e6:,.0f}M bool entries, kept until the next event.")
    section = append_section(args.benchmarks_md, "Scale on paper: pruning traffic vs gradient traffic",
                             command_line(), table, notes)
    print(section)


if __name__ == "__main__":
    main()
