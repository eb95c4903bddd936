#!/usr/bin/env python
"""Quality at equal tokens: every method takes SmolLM2-135M to ~half its parameters with the same
continued-training token budget T, then all are evaluated the same way.

    python tools/bench_quality.py [--steps 100] [--limit 500] [--methods efficientllm,oneshot_train,...]
        [--recovery lm|kd|lm,kd] [--train-only | --reeval] [--out runs/bench_quality]
        [--benchmarks-md BENCHMARKS.md] [--recipe CONFIG --source HF_DIR]

T = steps x global_batch x seq_len tokens of the shipped 4-domain train sample (default
100 x 4 x 256 = 102,400), bf16, one process, the same data order, learning-rate schedule
(warm-up + WSD) and seed for every method:

  efficientllm  this project's default: pruning-aware continued pretraining, global saliency
                (diagonal Fisher), auto-designed per-layer widths, OBS at every event (prune steps
                5..70 of T)
  efficientllm_taylor  the same with first-order Taylor saliency (the ablation behind the default)
  oneshot_train the default's pruning done once before training (effllm-prune-oneshot: Fisher
                saliency, the global efficientllm selector, OBS; the recipe's floors), 16k
                calibration tokens; then the same T tokens (pruning then training)
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

Recovery loss during the T tokens (--recovery): lm, the LM loss; kd, logit distillation from the
unpruned source (distill.alpha=1, temperature 1). Results are keyed <method>+<recovery>.

Evaluation of each final model (fp32, megatron_effllm/eval/suite.py): held-out perplexity per
domain (first --windows windows of 512 tokens) of the shipped held-out files and of text outside
the training mix (eval/outside_mix.py); the EfficientLLM 7-task set on the first --limit
validation examples per task (the whole split where smaller; acc_norm / acc as lm-eval-harness
defines them) with standard errors; LAMBADA last-word accuracy and target-word perplexity on the
first --limit passages. Resumable per method: a trained model (OUT/<key>/hf with info.json) is
not trained again, an entry of OUT/results.json is not evaluated again (--reeval: evaluate the
saved models again). The mean training step time of each run is kept; kd / lm of one method is
the teacher's cost. Held-out loss against tokens in PLOT_DIR/quality_heldout_loss.png; a section
appended to BENCHMARKS.md.
"""
import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from megatron_effllm.assets import corpus_files, smollm2_hf_dir
from megatron_effllm.convert import hf_io
from megatron_effllm.errors import UserError, cli_entry
from megatron_effllm.eval.model_loading import load_causal_lm
from megatron_effllm.eval.perplexity import calibration_windows
from megatron_effllm.eval.report import append_section, command_line, write_result
from megatron_effllm.eval.suite import evaluate_suite
from megatron_effllm.eval.tasks import PAPER7
from megatron_effllm.log import get_logger, setup_logging
from megatron_effllm.pruning import oneshot
from megatron_effllm.pruning.selection import Constraints
from megatron_effllm.training.config import load_config
from megatron_effllm.training.metrics import read_metrics
from megatron_effllm.training.trainer import run

logger = get_logger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "smollm2_135m_cpu_demo.yaml")
METHODS = ("source", "efficientllm", "efficientllm_taylor", "oneshot_train", "llm_pruner", "minitron", "sheared",
           "adapt", "scratch")
# Recovery loss during the T tokens: plain LM loss, or logit distillation from the unpruned source
# (distill: block; alpha 1 = pure KL at temperature 1, the probe's recipe).
RECOVERY = {"lm": [], "kd": ["distill.teacher=source", "distill.alpha=1.0", "distill.temperature=1.0"]}
SHEARED_SHORT_WINDOW = ["prune.l0_droprate_init=0.05", "prune.l0_lr=1.0", "prune.lagrangian_lr=10.0"]
ONESHOT = {  # method -> (estimator, strategy, prune hidden channels, OBS)
    # the default's estimator, global selector and OBS, applied once before training
    "oneshot_train": ("fisher", "efficientllm", True, True),
    "llm_pruner": ("taylor_elem", "uniform", False, False),
    "minitron": ("activation", "uniform", True, False),
}


def result_key(method: str, recovery: str) -> str:
    """results.json key: the source is not trained, so it has no recovery loss."""
    return method if method == "source" else f"{method}+{recovery}"


@dataclass(frozen=True)
class Setup:
    """What every method shares: the recipe (schedule, data, lr), the source model and the budget."""
    out: str
    steps: int
    target: float
    calib_tokens: int
    recipe: str = RECIPE
    source: str = ""  # an HF folder; empty: SmolLM2-135M (fp32)

    def source_dir(self) -> str:
        return self.source or smollm2_hf_dir(dtype="float32")

    def tokens(self) -> int:
        data = load_config(self.recipe).data
        return self.steps * data.global_batch * data.seq_len


def _train(s: Setup, run_dir: str, overrides: list) -> dict:
    steps = s.steps
    common = [f"run_dir={run_dir}", "resume=auto", f"train.steps={steps}", "train.progress_bar=false",
              f"train.log_interval={max(1, steps // 10)}", f"train.eval_interval={max(1, steps // 10)}",
              f"train.checkpoint_interval={steps}", "data.dynamic=false", "export.hf_dtype=fp32"]
    if s.source:
        common += [f"model.source={s.source}", "model.init=null"]
    return run(load_config(s.recipe, common + overrides))


def _prune_window(steps: int) -> list:
    return [f"prune.start_step={max(1, steps // 20)}", f"prune.end_step={int(steps * 0.7)}"]


def _oneshot(method: str, out_dir: str, s: Setup) -> dict:
    estimator, strategy, hidden, obs = ONESHOT[method]
    p = load_config(s.recipe).prune  # the floors and OBS damping the default uses in training
    src = hf_io.load_hf_model(s.source_dir())
    tok = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    model = hf_io.build_hf_model(src.arch, src.state_dict)
    opts = oneshot.OneShotOptions(target_params=int(round(s.target * src.arch.num_params())),
                                  estimator=estimator, strategy=strategy, obs=obs, obs_damp=p.obs_damp,
                                  constraints=Constraints(min_heads=max(1, p.min_heads_per_group),
                                                          min_ffn=max(1, p.min_ffn), prune_hidden=hidden,
                                                          allow_depth=p.allow_depth))
    t = time.time()
    windows = calibration_windows(tok, list(corpus_files("train").values()), s.calib_tokens, 512)
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


def _evaluate(hf_dir: str, limit: int, windows: int) -> dict:
    model, tok = load_causal_lm(hf_dir, "fp32", True, "auto")
    return evaluate_suite(model, tok, limit, windows=windows)


def _oneshot_model(method: str, s: Setup) -> tuple[str, dict]:
    """The method's one-shot pruned HF folder (made once; shared by both recovery losses) and its info."""
    pruned = os.path.join(s.out, "oneshot", method)
    info_path = os.path.join(pruned, "oneshot.json")
    if not os.path.isfile(info_path):
        write_result(pruned, "oneshot.json", _oneshot(method, os.path.join(pruned, "hf"), s))
    return os.path.join(pruned, "hf"), json.load(open(info_path))


def run_method(method: str, recovery: str, s: Setup) -> dict:
    """Produce OUT/<method>+<recovery>/hf; returns what the method did (time, tokens, curve). A method
    whose folder holds a finished model (hf/ and info.json) is not trained again."""
    if method == "source":
        return {"hf": s.source_dir()}
    key = result_key(method, recovery)
    mdir = os.path.join(s.out, key)
    if os.path.isfile(os.path.join(mdir, "info.json")):
        return json.load(open(os.path.join(mdir, "info.json")))
    run_dir = os.path.join(mdir, "run")
    info: dict = {"method": method, "recovery": recovery}
    t0 = time.time()
    target_keys = [f"prune.target_params={s.target}", "prune.count_embeddings=true"]
    loss = RECOVERY[recovery]
    if method in ONESHOT:
        pruned, done = _oneshot_model(method, s)
        info.update(done)
        summary = _train(s, run_dir, [f"model.source={pruned}", "prune.strategy=none", *loss])
    elif method == "scratch":
        ref = os.path.join(s.out, result_key("efficientllm", recovery), "run", "final", "architecture.json")
        if not os.path.isfile(ref):
            raise UserError(f"scratch takes the efficientllm result's shape; run --methods efficientllm "
                            f"--recovery {recovery} first ({ref})")
        # the teacher is the source: the student's own (random) initial weights would teach nothing
        summary = _train(s, run_dir, ["model.source=", f"model.init={{architecture: {ref}}}",
                                          "model.tokenizer=smollm2-135m", "prune.strategy=none",
                                          "optim.lr=3e-3", "optim.min_lr=3e-4",
                                          *[k.replace("=source", f"={s.source_dir()}") for k in loss]])
    else:
        strategy, _, estimator = method.partition("_")
        extra = [f"prune.estimator={estimator}"] if estimator else []
        if strategy == "sheared":
            extra += SHEARED_SHORT_WINDOW
        summary = _train(s, run_dir, [f"prune.strategy={strategy}", *target_keys, *_prune_window(s.steps),
                                          *extra, *loss])
    hf = os.path.join(mdir, "hf")
    if os.path.isdir(hf):
        shutil.rmtree(hf)
    shutil.copytree(os.path.join(run_dir, "final", "hf"), hf)
    info.update({"hf": hf, "train_seconds": summary["seconds"], "final_params": summary["final_params"],
                 "step_seconds": round(summary["seconds"]["train"] / s.steps, 3),
                 "widths": summary["widths"], "hidden_size": summary["hidden_size"],
                 "schedule": _schedule(run_dir),
                 "curve": _heldout_curve(run_dir, token_offset=info.get("calibration_tokens", 0)),
                 "wall_seconds": round(time.time() - t0, 1)})
    write_result(mdir, "info.json", info)
    return info


def _schedule(run_dir: str) -> list:
    """[(step, lr, parameters, loss)] from a run's train records: when pruning ends, the lr after it."""
    return [(r["step"], r["lr"], r["params"], r["loss"]) for r in read_metrics(run_dir) if r.get("kind") == "train"]


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


def _pm(value, stderr, scale: float = 100.0, digits: int = 1) -> str:
    """'v ± e' in percent; '-' when the value is missing."""
    if value is None:
        return "-"
    return f"{scale * value:.{digits}f}" + (f" ± {scale * stderr:.{digits}f}" if stderr is not None else "")


def teacher_cost(results: dict) -> dict:
    """{method: kd step seconds / lm step seconds} for every method run with both losses."""
    out = {}
    for key, r in results.items():
        method, _, recovery = key.partition("+")
        lm = results.get(f"{method}+lm", {}).get("step_seconds")
        if recovery == "kd" and lm and r.get("step_seconds"):
            out[method] = round(r["step_seconds"] / lm, 3)
    return out


def tables(results: dict) -> str:
    """Perplexity (in and outside the training mix, LAMBADA) and the 7 tasks with standard errors."""
    first = next(iter(results.values()))
    inside, outside = list(first["perplexity"]["domains"]), list(first.get("perplexity_outside", {}).get("domains", {}))
    head = ("| method | recovery | params | " + " | ".join(f"PPL {d}" for d in inside) + " | PPL geo (in mix) | "
            + "".join(f"PPL {d} | " for d in outside) + "PPL geo (outside) | LAMBADA acc % | LAMBADA word PPL | "
            + "s/step |\n")
    head += "|---|---|---|" + "---|" * (len(inside) + len(outside) + 5) + "\n"
    rows = ""
    for key, r in results.items():
        method, _, recovery = key.partition("+")
        out = r.get("perplexity_outside", {})
        lam = r.get("lambada", {})
        rows += (f"| {method} | {recovery or '-'} | {r['parameters'] / 1e6:.1f}M | "
                 + " | ".join(f"{r['perplexity']['domains'][d]:.1f}" for d in inside)
                 + f" | {r['perplexity']['geometric_mean']:.1f} | "
                 + "".join(f"{out['domains'][d]:.1f} | " if out else "- | " for d in outside)
                 + (f"{out['geometric_mean']:.1f}" if out else "-")
                 + f" | {_pm(lam.get('acc'), lam.get('acc_stderr'))} | "
                 + (f"{lam['perplexity']:.0f}" if lam else "-")
                 + f" | {r.get('step_seconds', '-')} |\n")
    tasks = "| method | recovery | " + " | ".join(PAPER7) + " | 7-task avg |\n"
    tasks += "|---|---|" + "---|" * (len(PAPER7) + 1) + "\n"
    for key, r in results.items():
        method, _, recovery = key.partition("+")
        tasks += (f"| {method} | {recovery or '-'} | "
                  + " | ".join(_pm(r["tasks"][t]["value"], r["tasks"][t].get("stderr")) for t in PAPER7)
                  + f" | {_pm(r['paper7_average'], r.get('paper7_stderr'), scale=1.0, digits=2)} |\n")
    return head + rows + "\n" + tasks


def parse_list(text: str, allowed: tuple, flag: str) -> list:
    items = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in items if m not in allowed]
    if unknown or not items:
        raise UserError(f"{flag}: unknown or no value(s) {', '.join(unknown) or repr(text)}; "
                        f"choose from {', '.join(allowed)}")
    return items


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of 4 x 256 tokens per method")
    ap.add_argument("--target", type=float, default=0.5, help="fraction of the source's parameters to keep")
    ap.add_argument("--limit", type=int, default=500,
                    help="zero-shot examples per task and LAMBADA passages (the whole split where smaller)")
    ap.add_argument("--windows", type=int, default=16, help="512-token windows per perplexity domain")
    ap.add_argument("--calib-tokens", type=int, default=16384, help="one-shot methods' calibration tokens")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--recovery", default="lm", help="recovery loss(es) during training: lm, kd or lm,kd")
    ap.add_argument("--train-only", action="store_true",
                    help="train and keep the models (OUT/<method>+<recovery>/hf); evaluate in a later call")
    ap.add_argument("--reeval", action="store_true",
                    help="evaluate the chosen methods again from their saved models (no retraining)")
    ap.add_argument("--out", default="runs/bench_quality")
    ap.add_argument("--recipe", default=RECIPE, help="training config every method shares (schedule, data, lr)")
    ap.add_argument("--source", default="", help="HF folder of the model to prune (default: SmolLM2-135M)")
    ap.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    ap.add_argument("--plot-dir", default="tools/bench_plots", help="where the held-out loss plot goes")
    args = ap.parse_args(argv)
    setup_logging()
    methods = parse_list(args.methods, METHODS, "--methods")
    recoveries = parse_list(args.recovery, tuple(RECOVERY), "--recovery")
    for flag, value in (("--steps", args.steps), ("--limit", args.limit), ("--windows", args.windows)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    setup = Setup(args.out, args.steps, args.target, args.calib_tokens, args.recipe, args.source)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    for method in methods:
        for recovery in (recoveries[:1] if method == "source" else recoveries):
            key = result_key(method, recovery)
            if key in results and not args.reeval:
                logger.info(f"[bench] {key}: already in {results_path}")
                continue
            logger.info(f"[bench] {key} ...")
            info = run_method(method, recovery, setup)
            if args.train_only:
                continue
            results[key] = {**info, **_evaluate(info["hf"], args.limit, args.windows)}
            r = results[key]
            logger.info(f"[bench] {key}: {r['parameters']:,} params, PPL geo {r['perplexity']['geometric_mean']:.2f}, "
                        f"outside {r['perplexity_outside']['geometric_mean']:.2f}, LAMBADA acc {r['lambada']['acc']:.3f} "
                        f"word PPL {r['lambada']['perplexity']:.1f}, 7-task avg {r['paper7_average']:.2f}")
            write_result(args.out, "results.json", results)  # after every method: a crash keeps the rest
    if args.train_only or not results:
        return
    order = {m: i for i, m in enumerate(METHODS)}
    results = dict(sorted(results.items(), key=lambda kv: (order.get(kv[0].partition("+")[0], 99), kv[0])))
    plot = os.path.join(args.plot_dir, "quality_heldout_loss.png")  # kept in the repository, shown in the README
    os.makedirs(args.plot_dir, exist_ok=True)
    plot_curves(results, plot)
    tokens = setup.tokens()
    limits = sorted({r.get("limit") for r in results.values()}, key=str)
    cost = teacher_cost(results)
    data = load_config(args.recipe).data
    notes = (f"T = {args.steps} steps x {data.global_batch} x {data.seq_len} = {tokens:,} training tokens per method (bf16, one CPU process, "
             f"shipped train sample, same seed, data order and schedule); target {args.target:g} of SmolLM2-135M's "
             f"parameters (embeddings counted). Recovery: lm = LM loss, kd = KL from the unpruned source (alpha 1, "
             f"temperature 1). oneshot_train = effllm-prune-oneshot (fisher, efficientllm selector, OBS) to the "
             f"target, then the same T tokens. Perplexity: {args.windows} x 512-token windows per domain, in the "
             f"training mix and outside it (wiki = SQuAD paragraphs, news = CoQA CNN, science = SciQ support; "
             f"megatron_effllm/eval/outside_mix.py). Zero-shot and LAMBADA: first {limits} validation examples per "
             f"task (the whole split where smaller; acc_norm for ARC-e/ARC-c/HellaSwag/OBQA/PIQA, acc for "
             f"BoolQ/WinoGrande), value ± standard error in percent. s/step: mean training step seconds of the run "
             f"(a shared machine; runs at different times). Teacher cost (kd s/step / lm s/step, same method): "
             f"{cost or 'needs both losses of a method'}. One-shot methods also read {args.calib_tokens:,} "
             f"calibration tokens. Plot: `{plot}`.")
    section = append_section(args.benchmarks_md, "Quality at equal tokens, LM loss vs distillation: SmolLM2-135M "
                             "to half its parameters", command_line(), tables(results), notes)
    logger.info(section)


if __name__ == "__main__":
    main()
