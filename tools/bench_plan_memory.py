#!/usr/bin/env python
"""The dry run's memory model against a measured CPU run: peak resident memory of one process.

    python tools/bench_plan_memory.py [--config configs/tiny_cpu.yaml] [--steps 3] [key=value ...]

Plans the config at one rank (``planning.make_plan``, nodes=1 gpus_per_node=1), then trains it in
this process for a few steps inside the pruning window (saliency, Hessians and masks live) with
the resident set size sampled every 5 ms, and prints the modelled step peak next to the measured
growth of the RSS over the RSS when the model is first built (tokenizer, data and source weights
loaded: host memory a GPU run also holds on the host). Terms a CPU does not
touch (DeepSpeed's ZeRO-2 reduce bucket is allocated but never written whole) are left out.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import psutil
import torch

from megatron_effllm.errors import cli_entry
from megatron_effllm.planning import make_plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_compaction_memory import _RssPeak  # the 5 ms RSS sampler


def measure(config: str, steps: int, overrides: list) -> dict:
    from megatron_effllm.training import trainer
    from megatron_effllm.training.config import load_config

    run_dir = tempfile.mkdtemp(prefix="plan_memory_")
    over = [f"run_dir={run_dir}", "resume=none", f"train.steps={steps}", "prune.start_step=0",
            f"prune.end_step={steps}", "prune.interval=1000", "train.checkpoint_interval=100000",
            "train.eval_interval=100000", "train.progress_bar=false", "export.hf=false",
            "data.dynamic=false", "data.heldout_batches=1", *overrides]
    plan = make_plan(config, nodes=1, gpus_per_node=1, gpu_mem_gb=1e6, overrides=over)
    mem = plan.memory[0][1]
    modelled = mem.step_peak - mem.terms["zero_buckets"]
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    at_build = []
    build = trainer.Trainer._build_model

    def first_build(self, *args, **kwargs):  # the baseline: tokenizer, data and source loaded
        if not at_build:
            at_build.append(psutil.Process().memory_info().rss)
        return build(self, *args, **kwargs)

    trainer.Trainer._build_model = first_build
    try:
        with _RssPeak() as rss:
            trainer.run(load_config(config, over))
    finally:
        trainer.Trainer._build_model = build
        shutil.rmtree(run_dir, ignore_errors=True)
    measured = rss.peak - at_build[0]
    return {"config": config, "overrides": overrides, "steps": steps, "terms": mem.terms,
            "modelled_bytes": modelled, "measured_bytes": measured, "ratio": measured / modelled}


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.config, args.steps, args.overrides), indent=1))


if __name__ == "__main__":
    main()
