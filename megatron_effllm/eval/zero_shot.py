"""Zero-shot scoring of (context, continuation) pairs with any Hugging Face causal LM.

The log-likelihood of a continuation follows lm-evaluation-harness (0.4.x, ``HFLM``):

- trailing spaces of the context move to the front of the continuation;
- ``context`` and ``context + continuation`` are tokenized separately with the tokenizer's
  default special tokens (a tokenizer that adds BOS adds it to both); the continuation tokens are
  the tokens of the whole string after the first ``len(tokens(context))``, so a merge across the
  boundary is scored as part of the continuation;
- an empty context is replaced by one prefix token (BOS, else EOS);
- the model reads ``(context + continuation)[:-1]``, left-truncated to the model's maximum length,
  and the score is the sum over continuation tokens of log-softmax (fp32) of the logits at the
  previous position; ``is_greedy`` says whether every continuation token is the argmax there.

Requests are sorted by length and right-padded into batches (causal attention makes right
padding exact without an attention mask); requests whose model inputs are identical (e.g. BoolQ's
" yes"/" no" after the same passage) share one forward. Only the logits of the last positions
that any row of a batch needs are computed when the model accepts ``logits_to_keep``.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_effllm.errors import UserError
from megatron_effllm.eval.tasks import PAPER7, TASKS, Example, load_task
from megatron_effllm.log import get_logger

log = get_logger(__name__)

DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Score:
    loglikelihood: float
    is_greedy: bool
    num_tokens: int


def max_length(model, tokenizer) -> int:
    """The longest input the model is scored on (config positions, else the tokenizer's limit)."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000_000:
        return limit
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer) -> int:
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token; an empty context cannot be scored")
    return tok


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's causal-LM ``_encode_pair`` makes them."""
    if not context:
        return [prefix_token_id(tokenizer)], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def score_token_pairs(
    model,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_len: int = DEFAULT_MAX_LENGTH,
    pad_id: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> list[Score]:
    """Score tokenized (context, continuation) pairs; results in the order of ``pairs``."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    device = next(model.parameters()).device
    # model input and target tokens of every pair
    inputs, targets = [], []
    for ctx, cont in pairs:
        if not cont:
            raise UserError("a continuation tokenized to nothing; it cannot be scored")
        if len(cont) > max_len:
            raise UserError(f"a continuation of {len(cont)} tokens exceeds the model's {max_len}-token window")
        inputs.append(tuple((ctx + cont)[-(max_len + 1):][:-1]))
        targets.append(cont)
    # one forward per distinct input, longest first
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, inp in enumerate(inputs):
        groups.setdefault(inp, []).append(i)
    order = sorted(groups, key=lambda inp: (-len(inp), inp))
    keep_ok = _accepts_logits_to_keep(model)
    results: list[Optional[Score]] = [None] * len(pairs)
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        width = len(batch[0])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for r, inp in enumerate(batch):
            ids[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        # first logit position any row needs: its input length minus its longest continuation
        first = min(len(inp) - max(len(targets[i]) for i in groups[inp]) for inp in batch)
        keep = width - first
        kwargs = {"logits_to_keep": keep} if keep_ok else {}
        logits = model(input_ids=ids.to(device), **kwargs).logits
        logits = logits[:, -keep:] if keep_ok else logits[:, first:]
        # gather every (row, position, target token) of the batch at once, on the model's device
        rows, cols, toks = [], [], []
        for r, inp in enumerate(batch):
            end = len(inp) - first  # kept-slice index just after the row's last input token
            for i in groups[inp]:
                n = len(targets[i])
                rows += [r] * n
                cols += range(end - n, end)
                toks += targets[i]
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        toks_t = torch.tensor(toks, device=device)
        # log-softmax in fp32 at the scored positions only
        scored = logits[rows_t, cols_t].float()
        picked = (scored.gather(-1, toks_t[:, None])[:, 0] - scored.logsumexp(-1)).cpu().tolist()
        hit = (scored.argmax(-1) == toks_t).cpu().tolist()
        k = 0
        for r, inp in enumerate(batch):
            for i in groups[inp]:
                n = len(targets[i])
                results[i] = Score(math.fsum(picked[k : k + n]), all(hit[k : k + n]), n)
                k += n
        if progress is not None:
            progress(min(b + batch_size, len(order)), len(order))
    return results  # type: ignore[return-value]


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    progress: Optional[Callable[[int, int], None]] = None,
) -> list[Score]:
    """Score (context, continuation) strings; see the module docstring for the exact definition."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    try:
        return score_token_pairs(model, pairs, batch_size, max_length(model, tokenizer), pad, progress)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------- metrics
def _argmax(values: Sequence[float]) -> int:
    # first maximum, like numpy.argmax
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predictions(example: Example, scores: Sequence[Score]) -> dict[str, int]:
    """Predicted choice by summed log-likelihood (acc) and by log-likelihood per character (acc_norm)."""
    lls = [s.loglikelihood for s in scores]
    return {
        "acc": _argmax(lls),
        "acc_norm": _argmax([ll / n for ll, n in zip(lls, example.choice_lengths)]),
    }


def mean_stderr(values: Sequence[float]) -> Optional[float]:
    """Standard error of a mean over examples (sample standard deviation / sqrt(n), as lm-eval
    reports it); None for fewer than two examples."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def task_metrics(name: str, examples: Sequence[Example], scores: Sequence[Sequence[Score]]) -> dict[str, float]:
    """The metrics lm-eval reports for the task, averaged over examples, each accuracy with its
    standard error (``<metric>_stderr``)."""
    spec = TASKS[name]
    n = len(examples)
    if spec.kind == "last_word":
        lls = [s[0].loglikelihood for s in scores]
        hits = [float(s[0].is_greedy) for s in scores]
        return {"acc": sum(hits) / n, "acc_stderr": mean_stderr(hits), "perplexity": math.exp(-sum(lls) / n)}
    hits = {m: [] for m in spec.metrics}
    for ex, sc in zip(examples, scores):
        pred = predictions(ex, sc)
        for m in spec.metrics:
            hits[m].append(float(pred[m] == ex.gold))
    return with_stderr(hits)


def with_stderr(per_example: dict[str, Sequence[float]]) -> dict[str, Optional[float]]:
    """{metric: mean, metric_stderr: its standard error} from each metric's per-example values."""
    out: dict[str, Optional[float]] = {}
    for m, values in per_example.items():
        out[m] = sum(values) / len(values)
        out[f"{m}_stderr"] = mean_stderr(values)
    return out


def evaluate_task(
    model,
    tokenizer,
    name: str,
    limit: Optional[int] = None,
    batch_size: int = 8,
    root: Optional[str] = None,
) -> dict:
    """{"task", "n", "metric", "value", "chance", "seconds", <metrics>} for one task; progress
    (about ten lines a task) goes to the logger at INFO."""
    examples = load_task(name, root=root, limit=limit)
    flat = [req for ex in examples for req in ex.requests]
    start = time.time()
    every = max(1, (len(flat) // batch_size) // 10)

    def progress(done: int, total: int) -> None:
        if done == total or done // batch_size % every == 0:
            log.info(f"[{name}] {done}/{total} forwards, {time.time() - start:.0f} s")

    flat_scores = loglikelihoods(model, tokenizer, flat, batch_size=batch_size, progress=progress)
    scores, k = [], 0
    for ex in examples:
        scores.append(flat_scores[k : k + len(ex.requests)])
        k += len(ex.requests)
    metrics = task_metrics(name, examples, scores)
    spec = TASKS[name]
    return {"task": name, "n": len(examples), **metrics, "metric": spec.paper_metric,
            "value": metrics[spec.paper_metric], "stderr": metrics[f"{spec.paper_metric}_stderr"],
            "chance": spec.chance, "seconds": round(time.time() - start, 2)}


def paper7_average(results: dict[str, dict]) -> Optional[float]:
    """Mean (in percent) of the 7 tasks' paper metrics; None unless all 7 were run."""
    if not all(t in results for t in PAPER7):
        return None
    return 100.0 * sum(results[t]["value"] for t in PAPER7) / len(PAPER7)


def paper7_stderr(results: dict[str, dict]) -> Optional[float]:
    """Standard error (in percent) of the 7-task average (the tasks are independent samples);
    None unless all 7 were run with a standard error each."""
    errors = [results.get(t, {}).get("stderr") for t in PAPER7]
    if any(e is None for e in errors):
        return None
    return 100.0 * math.sqrt(sum(e * e for e in errors)) / len(PAPER7)


def evaluate_tasks(
    model,
    tokenizer,
    names: Sequence[str],
    limit: Optional[int] = None,
    batch_size: int = 8,
    root: Optional[str] = None,
) -> dict:
    """{"tasks": {name: result}, "paper7_average": float | None, "paper7_stderr": float | None}."""
    results = {n: evaluate_task(model, tokenizer, n, limit, batch_size, root) for n in names}
    return {"tasks": results, "paper7_average": paper7_average(results), "paper7_stderr": paper7_stderr(results)}
