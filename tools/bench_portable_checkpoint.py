#!/usr/bin/env python
"""What the portable part of a checkpoint costs: bytes per rank and in total, and save time,
beside the engine's own files, measured in one training run.

    torchrun --nproc_per_node 2 tools/bench_portable_checkpoint.py [--config configs/tiny_cpu.yaml]
        [--steps 4] [--out runs/bench_portable] [--benchmarks-md BENCHMARKS.md] [key=value ...]

Trains ``--steps`` steps and checkpoints at the last one; the engine's ``save`` and
``training.portable.save`` are timed on every rank (the same save, side by side), and the bytes
per rank come from the checkpoint's manifest (each file's writing rank). Rank 0 writes
``OUT/result.json`` and appends a section to BENCHMARKS.md.
"""
import argparse
import functools
import json
import os
import sys
import time

from megatron_effllm.engine.deepspeed_engine import DeepSpeedEngine
from megatron_effllm.errors import cli_entry
from megatron_effllm.eval.report import append_section, command_line, write_result
from megatron_effllm.parallel import comm
from megatron_effllm.training import portable
from megatron_effllm.training.config import load_config
from megatron_effllm.training.trainer import run

TIMES = {"engine": 0.0, "portable": 0.0}


def _timed(key, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[key] += time.perf_counter() - t0
    return wrapped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny_cpu.yaml")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="runs/bench_portable")
    ap.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    DeepSpeedEngine.save = _timed("engine", DeepSpeedEngine.save)
    portable.save = _timed("portable", portable.save)
    run_dir = os.path.join(args.out, "run")
    cfg = load_config(args.config, [f"run_dir={run_dir}", "resume=fresh", f"train.steps={args.steps}",
                                    f"train.checkpoint_interval={args.steps}", "train.progress_bar=false",
                                    "export.hf=false", "train.portable_checkpoint=true", *args.overrides])
    run(cfg)
    times = comm.all_gather_object(dict(TIMES))
    if comm.global_rank() != 0:
        return 0
    folder = os.path.join(run_dir, "checkpoints", f"step_{args.steps:06d}")
    with open(os.path.join(folder, "MANIFEST.json")) as f:
        files = json.load(f)["files"]
    ranks = len(times)
    per_rank = {part: [sum(m["bytes"] for rel, m in files.items() if rel.startswith(prefix) and m["rank"] == r)
                       for r in range(ranks)] for part, prefix in (("engine", "ds/"), ("portable", "portable/"))}
    result = {"config": args.config, "overrides": args.overrides, "ranks": ranks, "bytes": per_rank,
              "seconds": {k: [t[k] for t in times] for k in TIMES}}
    write_result(args.out, "result.json", result)
    rows = ["| part | bytes per rank | total bytes | save seconds per rank |", "|---|---|---|---|"]
    for part in ("engine", "portable"):
        rows.append(f"| {'engine files (ds/)' if part == 'engine' else 'portable/'} | "
                    f"{', '.join(str(b) for b in per_rank[part])} | {sum(per_rank[part])} | "
                    f"{', '.join(f'{t:.2f}' for t in result['seconds'][part])} |")
    total_e, total_p = sum(per_rank["engine"]), sum(per_rank["portable"])
    notes = (f"{ranks} ranks. The portable state adds {total_p / total_e:.2f} x the engine's bytes "
             f"(12 bytes per parameter: fp32 master and two Adam moments, each tensor once) and "
             f"{max(result['seconds']['portable']) / max(result['seconds']['engine']):.2f} x its save time "
             "(slowest rank, the same save). Whole tensors go to one rank each: the tiny model's embedding "
             "is most of its parameters. Timings on a shared machine.")
    command = f"torchrun --nproc_per_node {ranks} " + command_line()[len("python "):]
    append_section(args.benchmarks_md, "Checkpoint: the portable part's cost", command, "\n".join(rows), notes)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main)())
