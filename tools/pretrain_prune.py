#!/usr/bin/env python
"""Pruning-aware pretraining: train a Llama-family model while removing its least salient
heads, KV groups, FFN channels, hidden channels (and layers) down to a target size.

    python tools/pretrain_prune.py --config configs/tiny_cpu.yaml [key=value ...]

Usually started through launchers/pretrain_prune.sh (deepspeed/torchrun, one process per GPU).
Overrides use dotted config keys, e.g. prune.interval=2 run_dir=runs/try1 train.steps=100.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_effllm.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", required=True, help="YAML run configuration (see configs/)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help="set by the deepspeed launcher; not for users")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)
    from megatron_effllm.training.config import load_config

    cfg = load_config(args.config, args.overrides)
    from megatron_effllm.training.faults import PeerFailure
    from megatron_effllm.training.trainer import run

    try:
        summary = run(cfg)
    except PeerFailure as err:
        # Not an input problem (exit code 2): a restart with resume: auto continues the run.
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print_summary(summary)


def print_summary(summary: dict) -> None:
    src, fin = summary["heldout_ppl_source"], summary["heldout_ppl_final"]
    print()
    print(f"parameters: {summary['source_params']:,} -> {summary['final_params']:,} "
          f"({summary['final_params'] / summary['source_params']:.1%})")
    print(f"final shape: hidden {summary['hidden_size']}; {summary['widths']}")
    print(f"{'held-out perplexity':<22}{'source':>10}{'pruned':>10}")
    for d in src:
        print(f"{d:<22}{src[d]:>10.2f}{fin[d]:>10.2f}")
    if "hf_dir" in summary:
        print(f"HF model: {summary['hf_dir']}")
    print(f"time: {summary['seconds']}")


if __name__ == "__main__":
    main()
