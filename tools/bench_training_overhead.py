#!/usr/bin/env python
"""Step-time overhead of the pruning machinery vs plain training of the same model.

    python tools/bench_training_overhead.py [--config configs/smollm2_135m_cpu_demo.yaml]
        [--steps 20] [--out runs/bench_overhead] [key=value ...]   (e.g. prune.stats_every=4)

Runs the same config twice in one process, back to back on the same data: once with
prune.strategy=none (plain continued pretraining), once as configured but with the masks only
(a prune event after every step from step 1, one compaction after the last step, so both runs
train a model of the source's size and the step-time ratio is the machinery's overhead). Reports
the mean time of a training step
(forward, backward incl. saliency hooks and Hessian statistics, optimizer), of a prune event
(selection, masks, OBS) and of a compaction (slicing + engine rebuild), each also in units of a
plain step. Writes JSON and appends a table to BENCHMARKS.md.
"""
import argparse
import json
import os

from megatron_effllm.errors import cli_entry


def _run(config, overrides):
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    cfg = load_config(config, overrides)
    summary = run(cfg)
    records = [json.loads(l) for l in open(os.path.join(cfg.run_dir, "metrics.jsonl"))]
    events = sum(1 for r in records if r.get("kind") == "architecture" and "target" in r)
    compactions = sum(1 for r in records if r.get("kind") == "compaction")
    return summary, events, compactions


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2_135m_cpu_demo.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/bench_overhead")
    ap.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    common = [f"train.steps={args.steps}", "train.checkpoint_interval=100000", "train.progress_bar=false",
              "export.hf=false", "data.dynamic=false", "optim.warmup_steps=2",
              f"train.log_interval={args.steps}"] + list(args.overrides)
    import shutil

    for sub in ("plain", "pruned"):  # metrics.jsonl appends: an earlier run's records would count
        shutil.rmtree(os.path.join(args.out, sub), ignore_errors=True)
    plain, _, _ = _run(args.config, common + ["prune.strategy=none", f"run_dir={args.out}/plain", "resume=none"])
    # Masks only during the steps (compaction once, after the last step), so every pruning-aware
    # step runs at the source's size, like the plain one: the ratio is the machinery's overhead,
    # not the speed-up of a smaller model.
    pruned, events, compactions = _run(args.config, common + [
        "prune.start_step=0", f"prune.end_step={args.steps}", f"prune.compact_every={10 ** 9}",
        f"run_dir={args.out}/pruned", "resume=none"])
    step_plain = plain["seconds"]["train"] / args.steps
    step_pruned = pruned["seconds"]["train"] / args.steps
    result = {
        "config": args.config, "steps": args.steps, "overrides": args.overrides,
        "plain_step_s": step_plain, "pruning_step_s": step_pruned,
        "step_overhead": step_pruned / step_plain - 1.0,
        "prune_event_s": pruned["seconds"]["prune"] / max(events, 1), "events": events,
        "compaction_s": pruned["seconds"]["compact"] / max(compactions, 1), "compactions": compactions,
        "params": [pruned["source_params"], pruned["final_params"]],
    }
    from megatron_effllm.eval.report import append_section, command_line, write_result

    write_result(args.out, "result.json", result)
    r = result
    table = (
        "| | seconds | in plain steps |\n|---|---|---|\n"
        f"| plain training step | {r['plain_step_s']:.2f} | 1.00 |\n"
        f"| pruning-aware step (saliency hooks, Hessians) | {r['pruning_step_s']:.2f} | {r['pruning_step_s'] / r['plain_step_s']:.2f} |\n"
        f"| one prune event (select, mask, OBS), {r['events']} events | {r['prune_event_s']:.2f} | {r['prune_event_s'] / r['plain_step_s']:.2f} |\n"
        f"| one compaction (slice + engine rebuild), {r['compactions']} | {r['compaction_s']:.2f} | {r['compaction_s'] / r['plain_step_s']:.2f} |\n"
    )
    notes = (f"`{args.config}`, {args.steps} steps each, back to back in one process: plain (prune.strategy=none) "
             f"and masked pruning every step from step 1 ({r['params'][0]:,} -> {r['params'][1]:,} parameters, "
             f"compacted once at the end)." + (f" Overrides: `{' '.join(args.overrides)}`." if args.overrides else ""))
    table = append_section(args.benchmarks_md, "Pruning overhead in training", command_line(), table, notes)
    print(table)


if __name__ == "__main__":
    main()
