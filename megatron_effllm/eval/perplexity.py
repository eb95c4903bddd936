"""Held-out perplexity per domain on fixed token windows (the number the benchmarks report).

Definition, for one domain file (JSON lines with a "text" field, optionally gzipped, or a plain
text file taken as one document):

1. documents are read in file order, each tokenized on its own without special tokens, and
   joined into one stream with the tokenizer's EOS token after every document;
2. the stream is cut into non-overlapping windows of ``seq_len`` tokens from its start, and the
   first ``windows`` of them are kept (fewer if the file is shorter; a file shorter than one
   window is an error);
3. each window is one independent forward (no context carried over); every position but the
   last predicts the next token, so a window contributes ``seq_len - 1`` scored tokens;
4. perplexity = exp(mean negative log-likelihood over all scored tokens of all windows), with the
   log-softmax taken in fp32 on the logits of the model's own dtype.

Across domains the benchmarks report the geometric mean (``geometric_mean``), which weights every
domain equally. The defaults (16 windows of 512 tokens, batches of 4) are the project's standard.
Works with any Hugging Face causal LM (``model(input_ids=...).logits``).
"""
from __future__ import annotations

import gzip
import json
import math
import os
from typing import Iterable, Union

import torch

from megatron_effllm.assets import corpus_files
from megatron_effllm.errors import UserError


def read_texts(path: str) -> Iterable[str]:
    """Documents of a .jsonl / .jsonl.gz file ("text" field) or of a plain text file (one document)."""
    if not os.path.isfile(path):
        raise UserError(f"text file {path} not found; pass existing .jsonl(.gz) or .txt files")
    opener = gzip.open if path.endswith(".gz") else open
    name = path[:-3] if path.endswith(".gz") else path
    with opener(path, "rt", encoding="utf-8") as f:
        if name.endswith((".jsonl", ".json")):
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path} line {i + 1}: expected a JSON object with a 'text' field") from None
        else:
            yield f.read()


def token_stream(tokenizer, path: str, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of a file's documents, joined with EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in read_texts(path):
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def token_windows(tokenizer, path: str, windows: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] non-overlapping windows from the start of the file (n <= windows)."""
    ids = token_stream(tokenizer, path, windows * seq_len)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"{path} has fewer than {seq_len} tokens; use a longer file or a shorter window")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration_windows(tokenizer, files: list[str], tokens: int, seq_len: int) -> torch.Tensor:
    """About ``tokens`` tokens as [n, seq_len] windows, split evenly over ``files`` (from their starts)."""
    if not files:
        raise UserError("no calibration files; pass --calib FILE... (.jsonl, .jsonl.gz or .txt)")
    if tokens < seq_len:
        raise UserError(f"--calib-tokens {tokens} is less than one window of {seq_len} tokens")
    per_file = max(1, -(-tokens // (seq_len * len(files))))
    parts = [token_windows(tokenizer, f, per_file, seq_len) for f in files]
    # interleave the files so that any prefix of the windows mixes every domain
    out = []
    for i in range(max(p.shape[0] for p in parts)):
        out += [p[i] for p in parts if i < p.shape[0]]
    return torch.stack(out[: max(1, tokens // seq_len)])


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4) -> tuple[float, int]:
    """Summed next-token NLL (fp32) over all windows, and the number of scored tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return total, count


def heldout_perplexity(
    model,
    tokenizer,
    files: Union[dict[str, str], Iterable[str]],
    windows: int = 16,
    seq_len: int = 512,
    batch_size: int = 4,
) -> dict[str, float]:
    """{domain: perplexity}; ``files`` is {domain: path} (e.g. assets.corpus_files('heldout'))
    or a list of paths (domain = file name up to the first dot)."""
    if not isinstance(files, dict):
        files = {os.path.basename(p).split(".")[0]: p for p in files}
    was_training = model.training
    model.eval()
    out = {}
    try:
        for domain, path in files.items():
            total, count = window_nll(model, token_windows(tokenizer, path, windows, seq_len), batch_size)
            out[domain] = math.exp(total / count)
    finally:
        model.train(was_training)
    return out


def geometric_mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise ValueError("geometric mean of no values")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def perplexity_files(spec: str) -> dict[str, str]:
    """{domain: path} from ``builtin`` (the shipped held-out corpus sample) or a comma-separated
    list of ``path`` or ``domain=path`` entries (domain defaults to the file name up to its first dot)."""
    if spec.strip() == "builtin":
        return corpus_files("heldout")
    files: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        domain, sep, path = part.partition("=")
        if not sep:
            domain, path = os.path.basename(part).split(".")[0], part
        if not os.path.isfile(path):
            raise UserError(f"perplexity file {path} not found; pass existing .jsonl(.gz)/.txt files or 'builtin'")
        if domain in files:
            raise UserError(f"two perplexity files for domain {domain!r}; name them as domain=path")
        files[domain] = path
    if not files:
        raise UserError("no perplexity files given; pass --ppl builtin or --ppl FILE[,FILE...]")
    return files


def evaluate_perplexity(model, tokenizer, files: dict[str, str], windows: int = 16, seq_len: int = 512,
                        batch_size: int = 4) -> dict:
    """{"windows", "seq_len", "domains": {domain: perplexity}, "geometric_mean"}."""
    ppl = heldout_perplexity(model, tokenizer, files, windows=windows, seq_len=seq_len, batch_size=batch_size)
    return {"windows": windows, "seq_len": seq_len, "domains": ppl, "geometric_mean": geometric_mean(ppl.values())}
