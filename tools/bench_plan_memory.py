#!/usr/bin/env python
"""The dry run's memory model against a measured CPU run: the peak of what torch allocates.

    python tools/bench_plan_memory.py [--config configs/tiny_cpu.yaml] [--steps 3] [key=value ...]

Plans the config at one rank (``planning.make_plan``, nodes=1 gpus_per_node=1), then trains it in
this process for a few steps inside the pruning window (saliency and Hessians accumulate; no
prune event, so no masks) under torch's profiler with allocation tracking, and prints the
modelled step peak next to the measured peak of the bytes torch holds on the CPU from the
model's build on (what ``torch.cuda.max_memory_allocated`` is on a GPU), with the live
allocations at that peak grouped by the phase and op that made them (the per-term account).
DeepSpeed's ZeRO-2 reduce bucket is allocated whole but never written whole on a CPU: it is left
out of both sides and its allocations counted. ``--rss`` instead measures the growth of the
resident set size over the RSS when the model is first built (sampled every 5 ms, without the
profiler): it adds what glibc's allocator keeps of freed memory, which the model does not describe.
"""
import argparse
import collections
import contextlib
import json
import os
import shutil
import sys
import tempfile

import psutil
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from megatron_effllm.errors import cli_entry
from megatron_effllm.planning import make_plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compaction_memory import _RssPeak  # the 5 ms RSS sampler

# The phases allocations are attributed to: (class or module, attribute, label).
PHASES = (("engine", "__call__", "forward"), ("engine", "backward", "backward"), ("engine", "step", "step"),
          ("engine", "step_unless", "step"), ("trainer", "_build_model", "build model"),
          ("trainer_mod", "build_engine", "build engine"), ("trainer", "heldout_losses", "held-out eval"))


def _labelled(fn, label):
    def inner(*args, **kwargs):
        with record_function(f"phase:{label}"):
            return fn(*args, **kwargs)
    return inner


def _allocations(prof) -> list:
    """(time, ptr, signed bytes, phase, op) of every CPU allocation and free, in time order."""
    out = []

    def walk(events, phase, op):
        for e in events:
            if e.typed[0] == _EventType.Allocation:
                f = e.typed[1]
                if f.device.type == "cpu":
                    out.append((e.start_time_ns, f.ptr, f.alloc_size, phase, op))
                continue
            name = e.name
            sub_phase = name[len("phase:"):] if name.startswith("phase:") else phase
            sub_op = op if name.startswith("phase:") or not name.startswith(("aten::", "autograd::")) or (
                op and not op.startswith("aten::empty") and name.startswith("aten::")) else name
            walk(e.children, sub_phase, sub_op if not name.startswith("phase:") else None)
    walk(prof.profiler.kineto_results.experimental_event_tree(), "other", None)
    return sorted(out)


def allocation_peak(allocations: list, skip_bytes: int) -> tuple:
    """(peak live bytes, {"phase: op": bytes live at the peak}, how many allocations of exactly
    ``skip_bytes`` were left out)."""
    live, cur, peak, at_peak, skipped, skipped_ptrs = {}, 0, 0, {}, 0, set()
    for _, ptr, n, phase, op in allocations:
        if n > 0 and n == skip_bytes:
            skipped, _ = skipped + 1, skipped_ptrs.add(ptr)
            continue
        if n > 0:
            live[ptr] = (n, phase, op)
            cur += n
        elif ptr in skipped_ptrs:
            skipped_ptrs.discard(ptr)
        elif ptr in live:
            cur -= live.pop(ptr)[0]
        if cur > peak:
            peak, at_peak = cur, dict(live)
    groups = collections.Counter()
    for n, phase, op in at_peak.values():
        groups[f"{phase}: {op or '-'}"] += n
    return peak, dict(groups.most_common()), skipped


def measure(config: str, steps: int, overrides: list, rss_only: bool = False) -> dict:
    from megatron_effllm.engine import deepspeed_engine
    from megatron_effllm.training import trainer
    from megatron_effllm.training.config import load_config

    run_dir = tempfile.mkdtemp(prefix="plan_memory_")
    over = [f"run_dir={run_dir}", "resume=none", f"train.steps={steps}", "prune.start_step=0",
            f"prune.end_step={steps}", "prune.interval=1000", "train.checkpoint_interval=100000",
            "train.eval_interval=100000", "train.progress_bar=false", "export.hf=false",
            "data.dynamic=false", "data.heldout_batches=1", *overrides]
    plan = make_plan(config, nodes=1, gpus_per_node=1, gpu_mem_gb=1e6, overrides=over)
    mem = plan.memory[0][1]
    left_out = ("zero_buckets", "masks")  # untouched on a CPU / no prune event in the window
    modelled = mem.step_peak - sum(mem.terms[k] for k in left_out)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    owners = {"engine": deepspeed_engine.DeepSpeedEngine, "trainer": trainer.Trainer, "trainer_mod": trainer}
    saved = [(owners[o], a, getattr(owners[o], a)) for o, a, _ in PHASES]
    at_build = []

    def first_build(build):
        def inner(self, *args, **kwargs):  # the RSS baseline: tokenizer, data and source loaded
            if not at_build:
                at_build.append(psutil.Process().memory_info().rss)
            return build(self, *args, **kwargs)
        return inner

    for (o, a, label), (_, _, fn) in zip(PHASES, saved):
        setattr(owners[o], a, _labelled(first_build(fn) if a == "_build_model" else fn, label))
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        with _RssPeak() as rss, (contextlib.nullcontext() if rss_only else prof):
            trainer.run(load_config(config, over))
    finally:
        for owner, a, fn in saved:
            setattr(owner, a, fn)
        shutil.rmtree(run_dir, ignore_errors=True)
    out = {"config": config, "overrides": overrides, "steps": steps, "terms": mem.terms, "modelled_bytes": modelled}
    if rss_only:
        rss_growth = rss.peak - at_build[0]
        return {**out, "rss_growth_bytes": rss_growth, "rss_ratio": rss_growth / modelled}
    bucket = mem.terms["zero_buckets"]
    peak, groups, skipped = allocation_peak(_allocations(prof), bucket if bucket else -1)
    return {**out, "left_out_of_both": {"zero_buckets": {"bytes": bucket, "allocations_of_that_size": skipped},
                                 "masks": mem.terms["masks"]},
            "measured_torch_peak_bytes": peak, "ratio": peak / modelled,
            "live_at_peak_bytes": {k: v for k, v in groups.items() if v >= 10**5}}


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rss", action="store_true",
                    help="measure the growth of the resident set size instead, without the profiler (whose records grow it)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.config, args.steps, args.overrides, rss_only=args.rss), indent=1))


if __name__ == "__main__":
    main()
