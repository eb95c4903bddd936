"""Quality and time of top-k cached distillation against online full-vocabulary distillation.

    python tools/bench_teacher_cache.py CONFIG [--topk K] [--out DIR] [--append BENCHMARKS.md] [key=value ...]

Four runs of CONFIG (each ``effllm-train`` in its own process and folder under ``--out``): the LM
loss alone (``distill.alpha=0``), online distillation over the full vocabulary, and top-k
distillation twice over one shared ``distill.cache_dir``: the first run writes the cache (its
teacher runs), the second reads it (no teacher). The overrides (e.g. ``distill.alpha=0.5
distill.teacher=smollm2-135m``) apply to every run but the first, which only drops the teacher.
Prints, per run, the final held-out perplexity per domain and its geometric mean, the training
seconds and the wall seconds, as JSON lines; ``--append`` adds them to a benchmarks file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_effllm.eval.report import append_section  # noqa: E402


def _summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r.get("kind") == "summary"][-1]


def _train(config: str, run_dir: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "megatron_effllm.cli.train", "--config", config,
           f"run_dir={run_dir}", "resume=fresh"] + overrides
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    s = _summary(run_dir)
    ppl = s["heldout_ppl_final"]
    return {"heldout_ppl": {d: round(v, 2) for d, v in ppl.items()},
            "geo_mean_ppl": round(math.exp(sum(map(math.log, ppl.values())) / len(ppl)), 2),
            "train_s": s["seconds"]["train"], "wall_s": s["seconds"]["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--out", default=None, help="folder of the four runs (default: a temporary one)")
    ap.add_argument("--append", default=None, help="benchmarks file to append a section to")
    args, overrides = ap.parse_known_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_teacher_cache_")
    cache = os.path.join(out, "teacher_cache")
    cached = overrides + [f"distill.topk={args.topk}", f"distill.cache_dir={cache}"]
    runs = {"LM loss only": ("lm", [o for o in overrides if not o.startswith("distill.")] + ["distill.alpha=0"]),
            "online KD, full vocabulary": ("online", overrides),
            f"top-{args.topk} KD, writing the cache": ("topk_write", cached),
            f"top-{args.topk} KD, reading the cache": ("topk_read", cached)}
    rows = {}
    for name, (folder, extra) in runs.items():
        rows[name] = _train(args.config, os.path.join(out, folder), extra)
        print(json.dumps({"run": name, **rows[name]}), flush=True)
    if args.append:
        domains = list(next(iter(rows.values()))["heldout_ppl"])
        table = ["| run | " + " | ".join(domains) + " | geo-mean PPL | train s | wall s |",
                 "|---" * (len(domains) + 4) + "|"]
        for name, r in rows.items():
            table.append(f"| {name} | " + " | ".join(str(r["heldout_ppl"][d]) for d in domains)
                         + f" | {r['geo_mean_ppl']} | {r['train_s']} | {r['wall_s']} |")
        command = "python tools/bench_teacher_cache.py " + " ".join([args.config, f"--topk {args.topk}"] + overrides)
        append_section(args.append, "Top-k cached distillation against online distillation", command,
                       "\n".join(table), "Final held-out perplexity per domain after each run (one process).")


if __name__ == "__main__":
    main()
