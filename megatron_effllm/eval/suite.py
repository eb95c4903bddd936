"""The evaluation the quality benchmark gives every model, in one call.

- held-out perplexity per domain of the training corpus sample (``in_mix``) and of text outside
  it (``outside_mix.py``), each with its geometric mean over domains;
- the EfficientLLM 7-task zero-shot set on the first ``limit`` validation examples of each task
  (the whole split where it is smaller), every accuracy with its standard error, and the 7-task
  average with its standard error;
- LAMBADA (OpenAI) on the first ``limit`` passages: last-word accuracy (greedy) with its standard
  error and target-word perplexity.
"""
from __future__ import annotations

import time

from megatron_effllm.assets import corpus_files
from megatron_effllm.eval.outside_mix import outside_mix_files
from megatron_effllm.eval.perplexity import evaluate_perplexity
from megatron_effllm.eval.tasks import PAPER7
from megatron_effllm.eval.zero_shot import evaluate_tasks

TASK_FIELDS = ("n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "metric", "value", "stderr", "perplexity")


def evaluate_suite(model, tokenizer, limit: int, windows: int = 16, seq_len: int = 512) -> dict:
    """{"parameters", "perplexity" (in-mix), "perplexity_outside", "tasks", "paper7_average",
    "paper7_stderr", "lambada", "limit", "eval_seconds"}."""
    t = time.time()
    ppl = evaluate_perplexity(model, tokenizer, corpus_files("heldout"), windows=windows, seq_len=seq_len)
    outside = evaluate_perplexity(model, tokenizer, outside_mix_files(), windows=windows, seq_len=seq_len)
    res = evaluate_tasks(model, tokenizer, [*PAPER7, "lambada"], limit=limit)
    tasks = {k: {m: v[m] for m in TASK_FIELDS if m in v} for k, v in res["tasks"].items()}
    lambada = tasks.pop("lambada")
    return {"parameters": sum(p.numel() for p in model.parameters()), "perplexity": ppl,
            "perplexity_outside": outside, "tasks": tasks, "paper7_average": res["paper7_average"],
            "paper7_stderr": res["paper7_stderr"],
            "lambada": {k: lambada[k] for k in ("n", "acc", "acc_stderr", "perplexity")},
            "limit": limit, "eval_seconds": round(time.time() - t, 1)}
