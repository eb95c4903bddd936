"""Dry run: the capacity plan of a run on a given cluster, before it is queued.

    effllm-plan CONFIG nodes=N gpus_per_node=G gpu_mem_gb=M [key=value ...] [--json]

Resolves the config (the same overrides as effllm-train) and the DP x TP x PP layout of
N x G ranks, and prints per-rank parameters per pipeline stage, per-rank memory (weights,
gradients, optimizer state, activations with and without recompute, logits, pruning state, the
compaction peak), checkpoint bytes per rank and in total, the DeepSpeed JSON and the launch
command lines. A run whose peak exceeds 90% of gpu_mem_gb is refused (exit 2) with one line
naming the largest term and what to change. ``launchers/pretrain_prune.sh CONFIG --dry-run ...``
runs this.
"""
import argparse
import contextlib
import sys

from megatron_effllm.errors import UserError, cli_entry

# DeepSpeed (the engine's config builder) logs its accelerator choice to stdout at import, and
# binds its log handler to the stdout of that moment: keep stdout for the plan (--json).
with contextlib.redirect_stdout(sys.stderr):
    from megatron_effllm.planning import make_plan
    from megatron_effllm.planning.report import to_json, to_text

SCALE_KEYS = {"nodes": int, "gpus_per_node": int, "gpu_mem_gb": float}


def split_scale(items: list) -> tuple[dict, list]:
    """The scale (nodes, gpus_per_node, gpu_mem_gb) and the config overrides among ``key=value`` items."""
    scale, overrides = {}, []
    for item in items:
        key, _, value = item.partition("=")
        if key in SCALE_KEYS:
            try:
                scale[key] = SCALE_KEYS[key](value)
            except ValueError:
                raise UserError(f"{key}={value!r} must be a number (e.g. {key}=8)") from None
        else:
            overrides.append(item)
    missing = [k for k in SCALE_KEYS if k not in scale]
    if missing:
        raise UserError(f"the dry run needs {', '.join(f'{k}=...' for k in missing)} "
                        "(e.g. nodes=2 gpus_per_node=8 gpu_mem_gb=80)")
    return scale, overrides


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(prog="effllm-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("config", help="YAML run configuration (see configs/)")
    ap.add_argument("items", nargs="*", help="nodes=N gpus_per_node=G gpu_mem_gb=M and key=value overrides")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    scale, overrides = split_scale(args.items)
    plan = make_plan(args.config, overrides=overrides, **scale)
    print(to_json(plan) if args.json else to_text(plan))
    verdict = plan.refusal()
    if verdict:
        print(f"error: {verdict}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
