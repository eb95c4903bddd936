#!/usr/bin/env python
"""Quality at equal tokens: every method takes SmolLM2-135M to ~half its parameters with the same
continued-training token budget T, then all are evaluated the same way.

    python tools/bench_quality.py [--steps 100] [--limit 100] [--methods efficientllm,llm_pruner,...]
        [--out runs/bench_quality] [--benchmarks-md BENCHMARKS.md]

T = steps x global_batch x seq_len tokens of the shipped 4-domain train sample (default
100 x 4 x 256 = 102,400), bf16, one process, the same data order, learning-rate schedule
(warm-up + WSD) and seed for every method:

  efficientllm  this project's default: pruning-aware continued pretraining, global saliency
                (diagonal Fisher), auto-designed per-layer widths, OBS at every event (prune steps
                5..70 of T)
  efficientllm_taylor  the same with first-order Taylor saliency (the ablation behind the default)
  llm_pruner    LLM-Pruner style: one-shot element-wise Taylor (param_first) on heads + FFN,
                the same ratio in every layer, 16k calibration tokens; then T tokens of training
  minitron      Minitron style: one-shot activation importance, uniform widths (hidden, heads,
                FFN); then T tokens
  sheared       Sheared-LLaMA: hard-concrete L0 gates + Lagrangian to a uniform target shape
                during the same window, folded, then continued training; same total T. Gates
                start open (drop rate 0.05: Sheared-LLaMA's 0.5 gates a random half of every
                group from the first step, which a 65-step window cannot recover from; measured:
                loss 12-14 in the soft phase), mask lr 1.0 as Sheared-LLaMA, lambda lr 10 so the
                expected size can follow the schedule within the window
  adapt         Adapt-Pruner: adaptive layer-wise sparsity from block cosine importance,
                incremental, in the same window
  scratch       the efficientllm result's exact shape, randomly initialised, trained on T tokens
  source        the unpruned model, no training (the ceiling)

Evaluation of each final model (fp32): held-out perplexity per domain (first 16 windows of 512
tokens of each shipped held-out file, megatron_effllm/eval/perplexity.py) and zero-shot accuracy
on the EfficientLLM 7-task set (first --limit validation examples per task; acc_norm / acc as
lm-eval-harness defines them). A method already in OUT/results.json is not run again (delete it
to redo). Each final model is an HF folder in OUT/<method>/hf; numbers in OUT/results.json;
held-out loss against tokens in tools/bench_plots/quality_heldout_loss.png; a section appended to
BENCHMARKS.md.
"""
import argparse
import json
import math
import os
import shutil
import time

import torch
from transformers import AutoTokenizer

from megatron_effllm.assets import corpus_files, smollm2_hf_dir
from megatron_effllm.convert import hf_io
from megatron_effllm.errors import UserError, cli_entry
from megatron_effllm.eval.model_loading import load_causal_lm
from megatron_effllm.eval.perplexity import calibration_windows, evaluate_perplexity
from megatron_effllm.eval.report import append_section, command_line, write_result
from megatron_effllm.eval.tasks import PAPER7
from megatron_effllm.eval.zero_shot import evaluate_tasks
from megatron_effllm.log import get_logger, setup_logging
from megatron_effllm.pruning import oneshot
from megatron_effllm.pruning.selection import Constraints
from megatron_effllm.training.config import load_config
from megatron_effllm.training.metrics import read_metrics
from megatron_effllm.training.trainer import run

logger = get_logger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "smollm2_135m_cpu_demo.yaml")
METHODS = ("source", "efficientllm", "efficientllm_taylor", "llm_pruner", "minitron", "sheared", "adapt", "scratch")
SHEARED_SHORT_WINDOW = ["prune.l0_droprate_init=0.05", "prune.l0_lr=1.0", "prune.lagrangian_lr=10.0"]
ONESHOT = {  # method -> (estimator, strategy, prune hidden channels)
    "llm_pruner": ("taylor_elem", "uniform", False),
    "minitron": ("activation", "uniform", True),
}


def _train(run_dir: str, steps: int, overrides: list) -> dict:

    common = [f"run_dir={run_dir}", "resume=auto", f"train.steps={steps}", "train.progress_bar=false",
              f"train.log_interval={max(1, steps // 10)}", f"train.eval_interval={max(1, steps // 10)}",
              f"train.checkpoint_interval={steps}", "data.dynamic=false", "export.hf_dtype=fp32"]
    return run(load_config(RECIPE, common + overrides))


def _prune_window(steps: int) -> list:
    return [f"prune.start_step={max(1, steps // 20)}", f"prune.end_step={int(steps * 0.7)}"]


def _oneshot(method: str, out_dir: str, target_fraction: float, calib_tokens: int) -> dict:
    estimator, strategy, hidden = ONESHOT[method]
    src = hf_io.load_hf_model(smollm2_hf_dir(dtype="float32"))
    tok = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    model = hf_io.build_hf_model(src.arch, src.state_dict)
    opts = oneshot.OneShotOptions(target_params=int(round(target_fraction * src.arch.num_params())),
                                  estimator=estimator, strategy=strategy,
                                  constraints=Constraints(prune_hidden=hidden))
    t = time.time()
    windows = calibration_windows(tok, list(corpus_files("train").values()), calib_tokens, 512)
    calib = oneshot.collect(model, src.arch, windows, opts)
    plan = oneshot.choose(calib, src.arch, src.state_dict, opts)
    small = oneshot.apply(src.state_dict, plan, calib, opts)
    hf_io.save_hf_model(plan.after, small, out_dir, tokenizer_dir=src.tokenizer_dir, dtype=torch.float32,
                        overwrite=True)
    return {"calibration_tokens": int(windows.numel()), "prune_seconds": round(time.time() - t, 1),
            "oneshot_params": plan.after.num_params()}


def _heldout_curve(run_dir: str, token_offset: int = 0) -> list:
    """[(tokens, mean held-out loss over domains)] from a run's eval records."""
    curve, trained = [], 0
    for r in read_metrics(run_dir):
        if r.get("kind") == "train":
            trained = max(trained, int(r["tokens"]))
        if r.get("kind") == "eval" or (r.get("kind") == "summary" and "heldout_ppl_final" in r):
            losses = r.get("heldout_loss") or {d: math.log(v) for d, v in r["heldout_ppl_final"].items()}
            tokens = r.get("tokens", trained)  # the summary comes after the last step
            curve.append((int(tokens) + token_offset, sum(losses.values()) / len(losses)))
    return sorted(set(curve))


def _evaluate(hf_dir: str, limit: int) -> dict:
    model, tok = load_causal_lm(hf_dir, "fp32", True, "auto")
    t = time.time()
    ppl = evaluate_perplexity(model, tok, corpus_files("heldout"), windows=16, seq_len=512)
    tasks = evaluate_tasks(model, tok, list(PAPER7), limit=limit)
    return {"parameters": sum(p.numel() for p in model.parameters()), "perplexity": ppl,
            "tasks": {k: {m: v[m] for m in ("n", "acc", "acc_norm", "metric", "value") if m in v}
                      for k, v in tasks["tasks"].items()},
            "paper7_average": tasks["paper7_average"], "eval_seconds": round(time.time() - t, 1)}


def run_method(method: str, out: str, steps: int, target: float, calib_tokens: int) -> dict:
    """Produce OUT/<method>/hf; returns what the method did (time, tokens, curve)."""
    mdir = os.path.join(out, method)
    run_dir = os.path.join(mdir, "run")
    info: dict = {}
    t0 = time.time()
    if method == "source":
        info["hf"] = smollm2_hf_dir(dtype="float32")
        return info
    target_keys = [f"prune.target_params={target}", "prune.count_embeddings=true"]
    if method in ONESHOT:
        pruned = os.path.join(mdir, "oneshot_hf")
        if not os.path.isfile(os.path.join(pruned, "config.json")):
            info.update(_oneshot(method, pruned, target, calib_tokens))
        summary = _train(run_dir, steps, [f"model.source={pruned}", "prune.strategy=none"])
    elif method == "scratch":
        ref = os.path.join(out, "efficientllm", "run", "final", "architecture.json")
        if not os.path.isfile(ref):
            raise UserError(f"scratch takes the efficientllm result's shape; run --methods efficientllm first ({ref})")
        summary = _train(run_dir, steps, ["model.source=", f"model.init={{architecture: {ref}}}",
                                          "model.tokenizer=smollm2-135m", "prune.strategy=none",
                                          "optim.lr=3e-3", "optim.min_lr=3e-4"])
    else:
        strategy, _, estimator = method.partition("_")
        extra = [f"prune.estimator={estimator}"] if estimator else []
        if strategy == "sheared":
            extra += SHEARED_SHORT_WINDOW
        summary = _train(run_dir, steps, [f"prune.strategy={strategy}", *target_keys, *_prune_window(steps), *extra])
    hf = os.path.join(mdir, "hf")
    if os.path.isdir(hf):
        shutil.rmtree(hf)
    shutil.copytree(os.path.join(run_dir, "final", "hf"), hf)
    info.update({"hf": hf, "train_seconds": summary["seconds"], "final_params": summary["final_params"],
                 "widths": summary["widths"], "hidden_size": summary["hidden_size"],
                 "curve": _heldout_curve(run_dir, token_offset=info.get("calibration_tokens", 0)),
                 "wall_seconds": round(time.time() - t0, 1)})
    return info


def plot_curves(results: dict, path: str) -> None:
    # here, not at the top: the backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for method, r in results.items():
        if r.get("curve"):
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", ms=3, label=method)
        elif method == "source":
            ax.axhline(math.log(r["perplexity"]["geometric_mean"]), color="k", ls="--", lw=1,
                       label="source (unpruned)")
    ax.set_xlabel("training tokens (one-shot methods: + calibration tokens)")
    ax.set_ylabel("held-out loss, mean over domains")
    ax.set_yscale("log")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)  # outside: the curves cross
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict, tokens: int) -> str:
    domains = list(next(iter(results.values()))["perplexity"]["domains"])
    head = ("| method | params | " + " | ".join(f"PPL {d}" for d in domains) + " | PPL geo | "
            + " | ".join(PAPER7) + " | 7-task avg |\n")
    head += "|---|---|" + "---|" * (len(domains) + 1 + len(PAPER7) + 1) + "\n"
    rows = ""
    for m, r in results.items():
        rows += (f"| {m} | {r['parameters'] / 1e6:.1f}M | "
                 + " | ".join(f"{r['perplexity']['domains'][d]:.1f}" for d in domains)
                 + f" | {r['perplexity']['geometric_mean']:.1f} | "
                 + " | ".join(f"{100 * r['tasks'][t]['value']:.1f}" for t in PAPER7)
                 + f" | {r['paper7_average']:.2f} |\n")
    return head + rows


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of 4 x 256 tokens per method")
    ap.add_argument("--target", type=float, default=0.5, help="fraction of the source's parameters to keep")
    ap.add_argument("--limit", type=int, default=100, help="zero-shot examples per task")
    ap.add_argument("--calib-tokens", type=int, default=16384, help="one-shot methods' calibration tokens")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default="runs/bench_quality")
    ap.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    ap.add_argument("--plot-dir", default="tools/bench_plots", help="where the held-out loss plot goes")
    args = ap.parse_args(argv)
    setup_logging()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    for method in methods:
        if method in results:
            logger.info(f"[bench] {method}: already in {results_path}")
            continue
        logger.info(f"[bench] {method} ...")
        info = run_method(method, args.out, args.steps, args.target, args.calib_tokens)
        results[method] = {**info, **_evaluate(info["hf"], args.limit)}
        r = results[method]
        logger.info(f"[bench] {method}: {r['parameters']:,} params, PPL geo {r['perplexity']['geometric_mean']:.2f}, "
                    f"7-task avg {r['paper7_average']:.2f}")
        write_result(args.out, "results.json", results)  # after every method: a crash keeps the rest
    order = {m: i for i, m in enumerate(METHODS)}
    results = dict(sorted(results.items(), key=lambda kv: order.get(kv[0], 99)))
    plot = os.path.join(args.plot_dir, "quality_heldout_loss.png")  # kept in the repository, shown in the README
    os.makedirs(args.plot_dir, exist_ok=True)
    plot_curves(results, plot)
    tokens = args.steps * 4 * 256
    notes = (f"T = {args.steps} steps x 4 x 256 = {tokens:,} training tokens per method (bf16, one CPU process, "
             f"shipped train sample, same seed and schedule); target {args.target:g} of SmolLM2-135M's parameters "
             f"(embeddings counted). Zero-shot: first {args.limit} validation examples per task (acc_norm for "
             f"ARC-e/ARC-c/HellaSwag/OBQA/PIQA, acc for BoolQ/WinoGrande); perplexity: 16 x 512-token windows "
             f"per held-out domain. One-shot methods also read {args.calib_tokens:,} calibration tokens. "
             f"Plot: `{plot}`.")
    section = append_section(args.benchmarks_md, "Quality at equal tokens: SmolLM2-135M to half its parameters",
                             command_line(), table(results, tokens), notes)
    logger.info(section)


if __name__ == "__main__":
    main()
