#!/usr/bin/env python
"""One-shot structured pruning of a Hugging Face model (or GGUF) to a parameter target.

    effllm-prune-oneshot --model SmolLM2-135M-Instruct.Q4_1.gguf --target-params 0.5 --out pruned
    effllm-prune-oneshot --model hf_dir --target-params 67M --out pruned --strategy uniform --obs --eval-ppl

Calibration text (default: the shipped corpus sample's train files) is tokenized with the
model's tokenizer; saliency is accumulated over the calibration windows (forward + backward of
the LM loss for gradient estimators), groups are selected by the strategy (the names of
prune.strategy; efficientllm by default: a global cost-aware ranking, non-uniform widths),
optionally OBS-compensated, sliced, and written as a folder that transformers loads
(trust_remote_code=True for non-uniform shapes). The saved folder is reloaded
and checked against the in-memory pruned model.
"""
import argparse
import math
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_effllm import output_dir
from megatron_effllm.assets import corpus_files
from megatron_effllm.convert import hf_io
from megatron_effllm.errors import UserError, cli_entry
from megatron_effllm.eval.perplexity import calibration_windows, geometric_mean, heldout_perplexity
from megatron_effllm.log import get_logger, setup_logging
from megatron_effllm.pruning import latency, oneshot
from megatron_effllm.pruning.latency import LatencyTable
from megatron_effllm.pruning.registry import ESTIMATORS, STRATEGIES, help_text
from megatron_effllm.pruning.selection import Constraints

logger = get_logger(__name__)


def parse_target(text: str) -> float:
    """'0.5' (fraction of the source), '67M', '1.2B', '67000000' -> a finite positive number."""
    t = text.strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(t[-1:], None)
    try:
        value = float(t[:-1]) * scale if scale else float(t)
    except ValueError:
        raise UserError(f"--target-params {text!r} is not a number; use e.g. 0.5, 67M or 67000000") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--target-params must be a finite positive number, got {text}; use e.g. 0.5 or 67M")
    return value


def parse_count(text: str, total: int) -> int:
    """--target-params as a parameter count of a model with ``total`` parameters."""
    value = parse_target(text)
    n = int(round(value * total)) if value <= 1.0 else int(value)
    if n >= total:
        raise UserError(f"--target-params {text} ({n:,}) is not below the model's {total:,} parameters")
    return n


def check_args(args) -> None:
    """Every numeric argument in range, before the model loads."""
    parse_target(args.target_params)
    for flag, value, least in (("--seq-len", args.seq_len, 2), ("--calib-tokens", args.calib_tokens, 1),
                               ("--batch-size", args.batch_size, 1), ("--eval-windows", args.eval_windows, 1),
                               ("--tp", args.tp, 1), ("--min-heads", args.min_heads, 1),
                               ("--min-ffn", args.min_ffn, 1), ("--ffn-multiple", args.ffn_multiple, 1),
                               ("--hidden-multiple", args.hidden_multiple, 1), ("--threads", args.threads, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least} (got {value})")
    if args.latency_table and args.cost != "latency":
        raise UserError("--latency-table is only read with --cost latency; add --cost latency or drop it")
    if args.cost == "latency" and STRATEGIES.get(args.strategy).selector != "global":
        raise UserError(f"--cost latency ranks units globally; --strategy {args.strategy} has no global ranking "
                        "(use --strategy efficientllm)")
    if not (math.isfinite(args.obs_damp) and args.obs_damp >= 0):
        raise UserError(f"--obs-damp must be a finite number >= 0 (got {args.obs_damp})")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="effllm-prune-oneshot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model folder or .gguf file")
    ap.add_argument("--target-params", required=True,
                    help="total parameters to keep (embeddings included): a count (67M, 67000000) or a fraction (0.5)")
    ap.add_argument("--out", required=True, help="output HF folder")
    ap.add_argument("--estimator", default="fisher", choices=ESTIMATORS.names(),
                    help="group saliency (default fisher): " + help_text(ESTIMATORS))
    ap.add_argument("--strategy", default="efficientllm", choices=STRATEGIES.names(oneshot=True),
                    help="how groups are selected (default efficientllm), as prune.strategy in training: "
                         + help_text(STRATEGIES, oneshot=True))
    ap.add_argument("--obs", action="store_true", help="OBS-update o_proj/down_proj for removed heads/FFN channels")
    ap.add_argument("--obs-hidden", action="store_true",
                    help="with --obs: also update q/k/v, gate/up (and untied lm_head) for removed hidden channels")
    ap.add_argument("--obs-damp", type=float, default=0.01)
    ap.add_argument("--calib", nargs="+", default=None, help="calibration text files (.jsonl[.gz] with 'text', or .txt)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--prune-hidden", action=argparse.BooleanOptionalAction, default=True,
                    help="let hidden (stem) channels compete (default on; the adapt strategy never prunes them)")
    ap.add_argument("--prune-kv", action=argparse.BooleanOptionalAction, default=True,
                    help="efficientllm: let whole KV groups compete (default on)")
    ap.add_argument("--allow-depth", action="store_true", help="efficientllm: whole layers may be removed")
    ap.add_argument("--tp", type=int, default=1, help="keep heads/KV groups/FFN widths divisible by this TP size")
    ap.add_argument("--min-heads", type=int, default=1, help="floor on query heads per layer")
    ap.add_argument("--min-ffn", type=int, default=1, help="floor on FFN width per layer")
    ap.add_argument("--ffn-multiple", type=int, default=1, help="keep FFN widths multiples of this")
    ap.add_argument("--hidden-multiple", type=int, default=1, help="keep the hidden size a multiple of this")
    ap.add_argument("--cost", default="params", choices=("params", "latency"),
                    help="efficientllm: rank saliency per parameter, or per second of batch-1 decode saved")
    ap.add_argument("--latency-table", default=None,
                    help="with --cost latency: a table from python -m megatron_effllm.pruning.latency (default: "
                         "measure one, transformers fp32 CPU); written to OUT/latency_table.json either way")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="dtype of the saved weights")
    ap.add_argument("--eval-ppl", action="store_true",
                    help="held-out perplexity per domain (shipped corpus sample) before and after, fp32")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if an earlier run of a megatron_effllm tool wrote it "
                         "(the new folder is complete before the old one is removed)")
    return ap.parse_args(argv)


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    check_args(args)
    output_dir.check_output(args.out, inputs=[args.model, *(args.calib or [])], overwrite=args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    src = hf_io.load_hf_model(args.model)
    arch, sd = src.arch, src.state_dict
    if src.tokenizer_dir is None:
        raise UserError(f"{args.model} has no tokenizer files; calibration text cannot be tokenized")
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    model = hf_io.build_hf_model(arch, sd)
    total = arch.num_params()
    table = None
    if args.cost == "latency":
        table = LatencyTable.load(args.latency_table) if args.latency_table else latency.measure_table(
            arch, log=logger.info)
    options = oneshot.OneShotOptions(
        target_params=parse_count(args.target_params, total),
        estimator=args.estimator, strategy=args.strategy, obs=args.obs, obs_hidden=args.obs_hidden,
        obs_damp=args.obs_damp, batch_size=args.batch_size,
        constraints=Constraints(tensor_parallel=args.tp, min_heads=args.min_heads, min_ffn=args.min_ffn,
                                ffn_multiple=args.ffn_multiple, hidden_multiple=args.hidden_multiple,
                                prune_hidden=args.prune_hidden, prune_kv=args.prune_kv,
                                allow_depth=args.allow_depth, cost=args.cost, latency=table),
    )
    options.check()
    logger.info(f"[load] {args.model}: {total:,} parameters ({arch.num_params(False):,} non-embedding), "
        f"{arch.num_layers} layers, {time.time() - t0:.1f} s")
    heldout = corpus_files("heldout")
    if args.eval_ppl:
        t = time.time()
        before = heldout_perplexity(model, tokenizer, heldout, windows=args.eval_windows, seq_len=args.seq_len)
        logger.info(f"[eval] before: {fmt_ppl(before)} (geo-mean {geometric_mean(before.values()):.2f}), {time.time() - t:.0f} s")

    t = time.time()
    files = args.calib or list(corpus_files("train").values())
    windows = calibration_windows(tokenizer, files, args.calib_tokens, args.seq_len)
    calib = oneshot.collect(model, arch, windows, options, log=logger.info)
    t_calib = time.time() - t
    t = time.time()
    plan = oneshot.choose(calib, arch, sd, options)
    small = oneshot.apply(sd, plan, calib, options)
    t_select = time.time() - t
    new = plan.after
    logger.info(f"[prune] {args.estimator} / {options.selector().name}{' + OBS' if args.obs else ''} (strategy "
        f"{args.strategy}): {total:,} -> {new.num_params():,} "
        f"parameters (target {options.target_params:,}); non-embedding {arch.num_params(False):,} -> "
        f"{new.num_params(False):,}; hidden {arch.hidden_size} -> {new.hidden_size}; "
        f"calibration {windows.numel():,} tokens in {t_calib:.0f} s, selection+surgery {t_select:.1f} s")
    for pos, shape in enumerate(new.layers):
        logger.info(f"  layer {shape.source_index:3d}: {shape.num_heads:3d} heads / {shape.num_kv_groups} kv, "
            f"FFN {shape.ffn_hidden_size}")
    del model, calib
    pruned = hf_io.build_hf_model(new, small)
    if args.eval_ppl:
        t = time.time()
        after = heldout_perplexity(pruned, tokenizer, heldout, windows=args.eval_windows, seq_len=args.seq_len)
        logger.info(f"[eval] after: {fmt_ppl(after)} (geo-mean {geometric_mean(after.values()):.2f}), {time.time() - t:.0f} s")

    dtype = getattr(torch, args.dtype)
    hf_io.save_hf_model(new, small, args.out, tokenizer_dir=src.tokenizer_dir, dtype=dtype, overwrite=args.overwrite)
    if table is not None:
        table.save(os.path.join(args.out, "latency_table.json"))
    # The folder must load in stock transformers and give the pruned model's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = windows[:1, :64]
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - pruned.to(dtype).float()(input_ids=ids).logits).abs().max()
    logger.info(f"[save] {args.out} ({args.dtype}); reloaded with AutoModelForCausalLM: max |logit diff| {float(diff):.2e}; "
        f"total {time.time() - t0:.0f} s")


def fmt_ppl(ppl: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())


if __name__ == "__main__":
    main()
