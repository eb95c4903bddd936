#!/usr/bin/env python
"""Peak extra memory of one compaction, per rank, as a multiple of the model's fp32 size.

    python tools/bench_compaction_memory.py [--config configs/smollm2_135m_cpu_demo.yaml]
        [--ranks 2] [--zero 2] [--out runs/bench_compaction_memory] [key=value ...]

Runs the config on ``--ranks`` real CPU processes (gloo) for a few steps with one compaction
(masks from the first prune event, compacted at the second) and samples every rank's resident
set size every 5 ms while the compaction runs. Reports, per rank, the RSS before the
compaction, its peak during it and after it, in MB and as multiples of the source model's fp32
bytes (4 x parameters). On a GPU the same code measures ``torch.cuda.max_memory_allocated``.
Writes JSON and appends a table to BENCHMARKS.md.
"""
import argparse
import json
import os
import platform
import socket
import threading
import time

import psutil
import torch
import torch.multiprocessing as mp

from megatron_effllm.errors import cli_entry


class _RssPeak:
    """The peak RSS of this process while the context runs (a sampling thread)."""

    def __init__(self, period_s: float = 0.005):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self.proc = psutil.Process()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period_s)

    def __enter__(self):
        self.before = self.proc.memory_info().rss
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.after = self.proc.memory_info().rss


def _rank(rank: int, world: int, port: int, config: str, overrides: list, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from megatron_effllm.training import trainer as trainer_mod
    from megatron_effllm.training.config import load_config

    measured = []
    compact = trainer_mod.Trainer._compact

    def measured_compact(self, *args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = compact(self, *args, **kwargs)
            torch.cuda.synchronize()
            measured.append({"before": before, "peak": torch.cuda.max_memory_allocated(),
                             "after": torch.cuda.memory_allocated(), "what": "cuda allocated"})
            return out
        with _RssPeak() as rss:
            out = compact(self, *args, **kwargs)
        measured.append({"before": rss.before, "peak": rss.peak, "after": rss.after, "what": "CPU RSS"})
        return out

    trainer_mod.Trainer._compact = measured_compact
    try:
        summary = trainer_mod.run(load_config(config, overrides))
        queue.put((rank, "ok", {"compactions": measured, "source_params": summary["source_params"],
                                "final_params": summary["final_params"]}))
    except BaseException as err:
        queue.put((rank, "error", f"{type(err).__name__}: {err}"))
        raise


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2_135m_cpu_demo.yaml")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_compaction_memory")
    ap.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    ap.add_argument("--label", default="", help="what is measured (e.g. the commit)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    # Two prune events (steps 1 and 2), compacted at the second; train past it.
    overrides = [f"run_dir={args.out}", "resume=none", f"parallel.zero_stage={args.zero}", "train.steps=3",
                 "data.micro_batch=1", f"data.global_batch={args.ranks}", "data.dynamic=false",
                 "train.checkpoint_interval=100000", "train.eval_interval=100000", "train.progress_bar=false",
                 "export.hf=false", "optim.warmup_steps=1", "prune.start_step=0", "prune.end_step=2",
                 "prune.interval=1", "prune.compact_every=2", "data.heldout_batches=1"] + list(args.overrides)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, args.ranks, port, args.config, overrides, queue))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    results = dict((r, (status, value)) for r, status, value in (queue.get() for _ in procs))
    for p in procs:
        p.join()
    errors = {r: v for r, (s, v) in results.items() if s != "ok"}
    if errors:
        raise SystemExit(f"error: ranks failed: {errors}")
    fp32 = 4 * results[0][1]["source_params"]
    rows = []
    for r in sorted(results):
        for c in results[r][1]["compactions"][:1]:
            rows.append({"rank": r, "what": c["what"], "before_mb": round(c["before"] / 2**20),
                         "peak_extra_mb": round((c["peak"] - c["before"]) / 2**20),
                         "peak_extra_x_fp32_model": round((c["peak"] - c["before"]) / fp32, 3),
                         "after_minus_before_mb": round((c["after"] - c["before"]) / 2**20)})
    result = {"label": args.label, "config": args.config, "ranks": args.ranks, "zero_stage": args.zero,
              "source_params": results[0][1]["source_params"], "fp32_model_mb": round(fp32 / 2**20),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "command": "python tools/bench_compaction_memory.py " + " ".join(argv or []), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    if args.benchmarks_md:
        lines = [f"\n### Compaction memory ({args.label or 'this commit'})\n",
                 f"`{result['command']}` ({result['machine']}); {args.ranks} ranks, ZeRO-{args.zero}, "
                 f"fp32 model {result['fp32_model_mb']} MB\n",
                 "| rank | measured | before (MB) | peak extra (MB) | peak extra / fp32 model | after - before (MB) |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['what']} | {r['before_mb']} | {r['peak_extra_mb']} | "
                  f"{r['peak_extra_x_fp32_model']} | {r['after_minus_before_mb']} |" for r in rows]
        with open(args.benchmarks_md, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
