"""Pruning-aware pretraining: train a Llama-family model while removing its least salient
heads, KV groups, FFN channels, hidden channels (and layers) down to a target size.

    effllm-train --config configs/tiny_cpu.yaml [key=value ...]

Usually started through launchers/pretrain_prune.sh (deepspeed/torchrun, one process per GPU,
running ``-m megatron_effllm.cli.train``). Overrides use dotted config keys, e.g.
prune.interval=2 run_dir=runs/try1 train.steps=100.
"""
import argparse
import os
import shlex
import sys

import torch.distributed as dist

from megatron_effllm.errors import cli_entry
from megatron_effllm.log import setup_logging
from megatron_effllm.training import checkpoint as ckpt
from megatron_effllm.training.config import load_config
from megatron_effllm.training.faults import PeerFailure
from megatron_effllm.training.preemption import Preempted
from megatron_effllm.training.trainer import run


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(prog="effllm-train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", required=True, help="YAML run configuration (see configs/)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help="set by the deepspeed launcher; not for users")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)
    setup_logging()
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run(cfg)
    except KeyboardInterrupt:
        # Ctrl-C: where the run can continue from instead of a traceback; 130 = 128 + SIGINT.
        if _is_rank_zero():
            print(f"\n{interrupted_message(args.config, args.overrides, cfg)}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Preempted:
        # SIGTERM/SIGUSR1: every rank saved the same step (the log line says where); a requeued
        # job continues with resume: auto, so this is a success for the scheduler.
        return
    except PeerFailure as err:
        # Not an input problem (exit code 2): a restart with resume: auto continues the run.
        # The same one "error:" line on stderr as cli_entry's, unprefixed.
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if _is_rank_zero():
        print_summary(summary)


def _is_rank_zero() -> bool:
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def interrupted_message(config: str, overrides: list, cfg) -> str:
    """One line after Ctrl-C: the newest checkpoint and the command that continues from it."""
    if cfg is None:
        return "interrupted before the run started; nothing was written"
    kept = ckpt.step_dirs(os.path.join(cfg.run_dir, "checkpoints"))
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    command = ["launchers/pretrain_prune.sh", config] if launched else ["effllm-train", "--config", config]
    command += [o for o in overrides if not o.startswith("resume=")]
    if not kept:
        return (f"interrupted before the first checkpoint (train.checkpoint_interval="
                f"{cfg.train.checkpoint_interval}); start again with: {shlex.join(command)}")
    step, folder = kept[0]
    return (f"interrupted; the last checkpoint is {folder} (step {step}); continue with: "
            f"{shlex.join(command + [f'resume={folder}'])}")


def print_summary(summary: dict) -> None:
    """The run's result table on stdout (printed, not logged: it is the output a user keeps)."""
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
