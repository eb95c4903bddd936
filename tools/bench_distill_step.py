"""Step time of a distillation step against a plain step, one process, on the same engine.

    python tools/bench_distill_step.py CONFIG [--steps N] [key=value ...]

Plain and distillation steps alternate (after two warm-up steps) on one engine built from the
config's source, with the teacher built as the trainer builds it (``distill.alpha=0.5``); prints
the median seconds of each and their ratio as one JSON line. Random tokens: the cost does not
depend on the text.
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
from megatron_effllm.training.config import load_config  # noqa: E402
from megatron_effllm.training.source import load_source  # noqa: E402
from megatron_effllm.training.teacher import Teacher  # noqa: E402
from megatron_effllm.training.trainer import Trainer  # noqa: E402


def _random_batch(gen: torch.Generator, micro_batch: int, seq_len: int, vocab: int) -> dict:
    t = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=gen)
    return {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(micro_batch, seq_len),
            "position_ids": torch.arange(seq_len).unsqueeze(0).expand(micro_batch, -1)}


def measure(config: str, overrides: list[str], steps: int) -> dict:
    run_dir = tempfile.mkdtemp(prefix="bench_distill_")
    cfg = load_config(config, overrides + ["distill.alpha=0.5", f"run_dir={run_dir}", "resume=fresh"])
    trainer = Trainer(cfg)
    arch, canonical, tokenizer = load_source(cfg)
    engine = build_engine("deepspeed", trainer._build_model(arch, canonical), trainer._engine_options())
    teacher = Teacher.build(cfg, arch, canonical, tokenizer)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"plain": [], "distill": []}
    for i in range(2 * steps + 2):
        kind = "distill" if i % 2 else "plain"
        trainer.teacher = teacher if kind == "distill" else None
        start = time.perf_counter()
        for k in range(trainer.grad_accum):
            loss = trainer._loss(engine, _random_batch(gen, cfg.data.micro_batch, cfg.data.seq_len, arch.vocab_size))
            engine.backward(loss, last_micro_batch=k == trainer.grad_accum - 1)
        engine.step()
        if i >= 2:  # the first plain and distillation steps warm up
            times[kind].append(time.perf_counter() - start)
    if trainer.lock is not None:
        trainer.lock.release()
    plain, distill = statistics.median(times["plain"]), statistics.median(times["distill"])
    return {"config": config, "overrides": overrides, "steps_each": steps, "grad_accum": trainer.grad_accum,
            "plain_s": round(plain, 4), "distill_s": round(distill, 4), "ratio": round(distill / plain, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=5, help="measured steps of each kind (default 5)")
    args, overrides = ap.parse_known_args()
    print(json.dumps(measure(args.config, overrides, args.steps)))


if __name__ == "__main__":
    main()
