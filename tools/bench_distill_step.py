"""Step time of a distillation step against a plain step, one process, on the same engine.

    python tools/bench_distill_step.py CONFIG [--steps N] [--topk K] [--append BENCHMARKS.md] [key=value ...]

Plain and online distillation steps (and, with ``--topk K``, steps reading the teacher's top-k
from a cache, ``distill.topk``) take turns (after one warm-up round) on one engine built from
the config's source, with the teacher built as the trainer builds it (``distill.alpha=0.5``);
prints the median seconds of each and their ratios to the plain step as one JSON line. The
cached step's entries are written, untimed, just before it, so it times what a run that finds
its samples cached pays: reading and verifying the entries and the top-k KL, no teacher.
Random tokens: the cost does not depend on the text.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_effllm.engine import build_engine  # noqa: E402
from megatron_effllm.eval.report import append_section  # noqa: E402
from megatron_effllm.training.config import load_config  # noqa: E402
from megatron_effllm.training.source import load_source  # noqa: E402
from megatron_effllm.training.teacher import Teacher  # noqa: E402
from megatron_effllm.training.teacher_cache import CachedTeacher, TopkStore  # noqa: E402
from megatron_effllm.training.trainer import Trainer  # noqa: E402


def _random_batch(gen: torch.Generator, micro_batch: int, seq_len: int, vocab: int) -> dict:
    t = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=gen)
    return {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(micro_batch, seq_len),
            "position_ids": torch.arange(seq_len).unsqueeze(0).expand(micro_batch, -1)}


def measure(config: str, overrides: list[str], steps: int, topk: int = 0) -> dict:
    run_dir = tempfile.mkdtemp(prefix="bench_distill_")
    cfg = load_config(config, overrides + ["distill.alpha=0.5", f"run_dir={run_dir}", "resume=fresh"])
    trainer = Trainer(cfg)
    arch, canonical, tokenizer = load_source(cfg)
    engine = build_engine("deepspeed", trainer._build_model(arch, canonical), trainer._engine_options())
    teacher = Teacher.build(cfg, arch, canonical, tokenizer)
    kinds = {"plain": None, "distill": teacher}
    if topk:
        store = TopkStore(os.path.join(run_dir, "teacher_cache"), {"k": topk, "seq_len": cfg.data.seq_len})
        kinds["cached"] = CachedTeacher(store, lambda: teacher, teacher.alpha, teacher.temperature)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range((steps + 1) * len(kinds)):
        kind = list(kinds)[i % len(kinds)]
        trainer.teacher = kinds[kind]
        batches = [_random_batch(gen, cfg.data.micro_batch, cfg.data.seq_len, arch.vocab_size)
                   for _ in range(trainer.grad_accum)]
        if kind == "cached":  # written now, read in the timed step
            for b in batches:
                trainer.teacher.entries(b["tokens"], b["position_ids"])
        start = time.perf_counter()
        for k, batch in enumerate(batches):
            loss = trainer._loss(engine, batch)
            engine.backward(loss, last_micro_batch=k == trainer.grad_accum - 1)
        engine.step()
        if i >= len(kinds):  # the first round warms up
            times[kind].append(time.perf_counter() - start)
    if trainer.lock is not None:
        trainer.lock.release()
    median = {k: statistics.median(v) for k, v in times.items()}
    out = {"config": config, "overrides": overrides, "steps_each": steps, "grad_accum": trainer.grad_accum,
           "plain_s": round(median["plain"], 4), "distill_s": round(median["distill"], 4),
           "ratio": round(median["distill"] / median["plain"], 3)}
    if topk:
        out.update(topk=topk, cached_s=round(median["cached"], 4),
                   cached_ratio=round(median["cached"] / median["plain"], 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=5, help="measured steps of each kind (default 5)")
    ap.add_argument("--topk", type=int, default=0, help="also time steps reading a top-K teacher cache")
    ap.add_argument("--append", default=None, help="benchmarks file to append a section to")
    args, overrides = ap.parse_known_args()
    r = measure(args.config, overrides, args.steps, args.topk)
    print(json.dumps(r))
    if args.append:
        head, row = "| plain step | online KD step | ratio |", f"| {r['plain_s']} s | {r['distill_s']} s | {r['ratio']}x |"
        if args.topk:
            head += f" top-{args.topk} cached KD step | ratio |"
            row += f" {r['cached_s']} s | {r['cached_ratio']}x |"
        command = " ".join(["python tools/bench_distill_step.py", args.config, f"--steps {args.steps}"]
                           + ([f"--topk {args.topk}"] if args.topk else []) + overrides)
        append_section(args.append, "Distillation step cost, online and cached", command,
                       "\n".join([head, "|---" * head.count(" |") + "|", row]),
                       "Median seconds of each kind of step, taking turns on one engine, one process.")


if __name__ == "__main__":
    main()
