#!/usr/bin/env python
"""Speed of the pruned model at the edge, and of training against the machine's peak.

    python tools/bench_speed.py --pruned runs/bench_oneshot/hf [--source smollm2-135m]
        [--new-tokens 64] [--overhead runs/bench_overhead/result.json] [--out runs/bench_speed]

1. Dense matmul peak of this machine (torch, fp32 and bf16, 2048^3, all threads).
2. Training throughput as a fraction of that peak, from a plain step of
   tools/bench_training_overhead.py (its result.json; run it first), with the model FLOPs
   6 N + 12 L H Q T per token (N non-embedding parameters + the output projection).
3. Inference, batch 1, greedy, ``--new-tokens`` tokens after a short prompt: tokens/s of the source
   and the pruned model in transformers (fp32) and in llama.cpp (llama-cpp-python, GGUF f16 and
   q8_0 written by effllm-export-gguf), and the ratio pruned / source.
4. llama.cpp correctness: the GGUF's logits on a prompt against the HF model's (max |diff|, top-1
   agreement), and its greedy text.

``--selection``: instead of ``--pruned``, prune the source one-shot to ``--target`` (fisher,
efficientllm, OBS; one calibration pass) with each selection variant: today's default, widths
rounded to ``--ffn-multiple`` / ``--hidden-multiple``, ``cost: latency`` (a table measured here,
transformers fp32 decode, saved as OUT/latency_table.json; ``--latency-table`` reuses one), both,
and both with depth pruning; held-out perplexity and tokens/s of each against the source, side by side.

llama.cpp is optional: ``pip install llama-cpp-python==0.3.36`` (it compiles llama.cpp, several
minutes); without it those rows are skipped and say so. Writes OUT/result.json and appends a
section to BENCHMARKS.md.
"""
import argparse
import dataclasses
import os
import time

from megatron_effllm.errors import UserError, cli_entry

PROMPT = "The Linux kernel documentation explains how"


def matmul_peak(dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def train_flops_per_token(arch, seq_len: int) -> float:
    n = arch.num_params(include_embeddings=False) + arch.vocab_size * arch.hidden_size
    attn = sum(12 * l.num_heads * arch.head_dim * seq_len for l in arch.layers)
    return 6 * n + attn


def timed_hf(model, ids, new_tokens: int):
    """A timing function: greedy generation of exactly ``new_tokens`` tokens -> (seconds, ids)."""
    import torch

    def run():
        with torch.no_grad():
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()

    return run


def timed_llama_cpp(llm, ids: list, new_tokens: int):
    def run():
        out = []
        t = time.perf_counter()
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) >= new_tokens:
                break
        return time.perf_counter() - t, out

    return run


def llama_cpp_logits(llm, ids: list):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.reset()
    return logits


def best_rates(runners: dict, new_tokens: int, rounds: int) -> dict:
    """{name: (best tokens/s, generated ids)}; the runners take turns in every round, so a
    slow spell of a shared machine hits all of them and the ratios hold."""
    best = {name: (0.0, None) for name in runners}
    for name, run in runners.items():
        run()  # warm-up
    for _ in range(rounds):
        for name, run in runners.items():
            dt, out = run()
            if new_tokens / dt > best[name][0]:
                best[name] = (new_tokens / dt, out)
    return best


def selection_variants(ffn_multiple: int, hidden_multiple: int, table):
    """name -> Constraints of the one-shot selection variants compared by --selection."""
    from megatron_effllm.pruning.selection import Constraints

    w = dict(ffn_multiple=ffn_multiple, hidden_multiple=hidden_multiple)
    lat = dict(cost="latency", latency=table)
    return {"default (params)": Constraints(), f"widths {ffn_multiple}/{hidden_multiple}": Constraints(**w),
            "latency cost": Constraints(**lat), "widths + latency": Constraints(**w, **lat),
            "widths + latency + depth": Constraints(**w, **lat, allow_depth=True)}


def run_selection(args):
    """Prune the source with every selection variant, then perplexity and speed side by side."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer

    from megatron_effllm.assets import corpus_files
    from megatron_effllm.convert import hf_io
    from megatron_effllm.convert.gguf_export import export_gguf
    from megatron_effllm.eval.perplexity import calibration_windows, evaluate_perplexity
    from megatron_effllm.eval.report import append_section, command_line, write_result
    from megatron_effllm.pruning import latency, oneshot
    from megatron_effllm.training.source import resolve_source

    torch.manual_seed(0)
    src = hf_io.load_hf_model(resolve_source(args.source), dtype=torch.float32)
    arch, sd = src.arch, src.state_dict
    tok = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    os.makedirs(args.out, exist_ok=True)
    t = time.time()
    table = (latency.LatencyTable.load(args.latency_table) if args.latency_table
             else latency.measure_table(arch, log=lambda m: print(m, flush=True)))
    table.save(os.path.join(args.out, "latency_table.json"))
    t_table = time.time() - t
    print(f"[latency] {table} ({t_table:.0f} s)", flush=True)
    model = hf_io.build_hf_model(arch, sd).eval()
    heldout = corpus_files("heldout")
    ppl = lambda m: evaluate_perplexity(m, tok, heldout, windows=args.windows, seq_len=512)  # noqa: E731
    target = int(round(args.target * arch.num_params()))
    base = oneshot.OneShotOptions(target_params=target, estimator="fisher", obs=True)
    windows = calibration_windows(tok, list(corpus_files("train").values()), args.calib_tokens, 512)
    calib = oneshot.collect(model, arch, windows, base)
    rows = {"source": {"params": arch.num_params(), "perplexity": ppl(model)["geometric_mean"], "model": model,
                       "widths": arch.widths_summary()}}
    for name, c in selection_variants(args.ffn_multiple, args.hidden_multiple, table).items():
        opts = oneshot.OneShotOptions(target_params=target, estimator="fisher", obs=True, constraints=c)
        plan = oneshot.choose(calib, arch, sd, opts)
        small = oneshot.apply(sd, plan, calib, opts)
        m = hf_io.build_hf_model(plan.after, small).eval()
        rows[name] = {"params": plan.after.num_params(), "perplexity": ppl(m)["geometric_mean"], "model": m,
                      "hidden": plan.after.hidden_size, "layers": plan.after.num_layers,
                      "widths": plan.after.widths_summary()}
        print(f"[{name}] {rows[name]['params']:,} params, geo-mean PPL {rows[name]['perplexity']:.2f}; "
              f"{rows[name]['widths']}", flush=True)
        if importlib.util.find_spec("llama_cpp") is not None:
            folder = os.path.join(args.out, f"hf{len(rows) - 1}")
            hf_io.save_hf_model(plan.after, small, folder, tokenizer_dir=src.tokenizer_dir, dtype=torch.bfloat16,
                                overwrite=True)
            rows[name]["folder"] = folder
    del calib
    ids = tok(PROMPT, return_tensors="pt").input_ids
    runners = {}
    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None  # optional dependency
    if have_llama_cpp:
        from llama_cpp import Llama

        hf_io.save_hf_model(arch, sd, os.path.join(args.out, "hf0"), tokenizer_dir=src.tokenizer_dir,
                            dtype=torch.bfloat16, overwrite=True)
        rows["source"]["folder"] = os.path.join(args.out, "hf0")
    for name, r in rows.items():
        runners[(name, "hf")] = timed_hf(r.pop("model"), ids, args.new_tokens)
        for dtype in ("f16", "q8_0") if have_llama_cpp else ():
            gguf = f"{r['folder']}.{dtype}.gguf"
            export_gguf(r["folder"], gguf, dtype=dtype, overwrite=True)
            llm = Llama(model_path=gguf, n_ctx=256, n_threads=torch.get_num_threads(), n_batch=256, verbose=False)
            runners[(name, dtype)] = timed_llama_cpp(llm, ids[0].tolist(), args.new_tokens)
    for (name, runtime), (rate, _) in best_rates(runners, args.new_tokens, args.rounds).items():
        rows[name][runtime] = rate
    write_result(args.out, "result.json", {"latency_table": dataclasses.asdict(table), "target_params": target, "rows": rows,
                                           "threads": torch.get_num_threads(), "llama_cpp": have_llama_cpp})
    runtimes = ("hf", "f16", "q8_0") if have_llama_cpp else ("hf",)
    label = {"hf": "transformers fp32", "f16": "llama.cpp f16", "q8_0": "llama.cpp q8_0"}
    s = rows["source"]
    table_md = ("| selection | params | layers / hidden | held-out PPL (geo-mean) | "
                + " | ".join(f"{label[k]} tokens/s (x source)" for k in runtimes) + " |\n|---|---|---|---|"
                + "---|" * len(runtimes) + "\n")
    for name, r in rows.items():
        table_md += (f"| {name} | {r['params'] / 1e6:.1f}M | {r.get('layers', arch.num_layers)} / "
                     f"{r.get('hidden', arch.hidden_size)} | {r['perplexity']:.1f} | "
                     + " | ".join(f"{r[k]:.1f} ({r[k] / s[k]:.2f}x)" for k in runtimes) + " |\n")
    table_md += "\nPer-layer widths (heads/KV groups/FFN):\n\n" + "".join(
        f"- {name}: {r['widths']}\n" for name, r in rows.items() if name != "source")
    notes = (f"`{args.source}` pruned one-shot to {args.target:g} of its parameters (fisher, efficientllm, OBS, "
             f"{windows.numel():,} calibration tokens), no training afterwards; perplexity: first {args.windows} "
             f"windows of 512 tokens per held-out domain. Latency table (transformers fp32 decode, "
             f"{table.threads} threads, measured in {t_table:.0f} s): per token, a query head "
             f"{1e6 * table.head:.1f} us, a KV group {1e6 * table.kv:.1f} us, an FFN channel {1e9 * table.ffn:.0f} ns, "
             f"a hidden channel {1e6 * table.hidden:.2f} us, a layer's fixed part {1e6 * table.layer:.0f} us, the "
             f"source {1e3 * table.total:.1f} ms. Speed: batch 1, greedy, {args.new_tokens} new tokens after a "
             f"{ids.shape[1]}-token prompt, best of {args.rounds} after a warm-up, all models and runtimes taking "
             f"turns in every round (a shared 2-core machine: compare the ratios)."
             + ("" if have_llama_cpp else " llama.cpp: not installed (pip install llama-cpp-python==0.3.36)."))
    print(append_section(args.benchmarks_md, "Speed: selection for speed (widths, latency cost)", command_line(),
                         table_md, notes))


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="smollm2-135m", help="HF folder, or smollm2-135m")
    ap.add_argument("--pruned", help="the pruned model's HF folder")
    ap.add_argument("--selection", action="store_true", help="prune the source with each selection variant here")
    ap.add_argument("--target", type=float, default=0.5, help="--selection: fraction of the parameters to keep")
    ap.add_argument("--ffn-multiple", type=int, default=32)
    ap.add_argument("--hidden-multiple", type=int, default=32)
    ap.add_argument("--latency-table", default=None, help="--selection: reuse this table instead of measuring")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--windows", type=int, default=16, help="--selection: held-out windows of 512 tokens per domain")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per model and runtime (the best counts)")
    ap.add_argument("--overhead", default="runs/bench_overhead/result.json",
                    help="result.json of tools/bench_training_overhead.py (training throughput row)")
    ap.add_argument("--out", default="runs/bench_speed")
    ap.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.selection == bool(args.pruned):
        raise UserError("give either --pruned FOLDER or --selection")
    if args.selection:
        return run_selection(args)
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_effllm.convert.gguf_export import export_gguf
    from megatron_effllm.convert.hf_io import load_hf_model
    from megatron_effllm.eval.report import append_section, command_line, write_result
    from megatron_effllm.training.source import resolve_source

    source = resolve_source(args.source)
    for path in (source, args.pruned):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
    threads = torch.get_num_threads()
    result = {"threads": threads, "peak_gflops": {"fp32": matmul_peak(torch.float32),
                                                  "bf16": matmul_peak(torch.bfloat16)}}
    print(f"[peak] fp32 {result['peak_gflops']['fp32']:.0f} GFLOP/s, bf16 {result['peak_gflops']['bf16']:.0f}", flush=True)
    if os.path.isfile(args.overhead):
        o = json.load(open(args.overhead))
        arch = load_hf_model(source).arch
        tokens = 4 * 256  # the demo recipe's global batch x sequence
        flops = train_flops_per_token(arch, 256) * tokens / o["plain_step_s"]
        result["training"] = {"tokens_per_s": tokens / o["plain_step_s"], "gflops": flops / 1e9,
                              "fraction_of_bf16_peak": flops / 1e9 / result["peak_gflops"]["bf16"]}
    import importlib.util

    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None  # optional dependency
    tok = AutoTokenizer.from_pretrained(source)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    models, runners = {}, {}
    for name, path in (("source", source), ("pruned", args.pruned)):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            ref_logits = model(input_ids=ids).logits[0].float().numpy()
        models[name] = {"params": sum(p.numel() for p in model.parameters())}
        runners[(name, "hf")] = timed_hf(model, ids, args.new_tokens)
        if have_llama_cpp:
            from llama_cpp import Llama

            for dtype in ("f16", "q8_0"):
                gguf = os.path.join(args.out, f"{name}.{dtype}.gguf")
                if not os.path.isfile(gguf):
                    export_gguf(path, gguf, dtype=dtype, overwrite=True)
                llm = Llama(model_path=gguf, n_ctx=256, n_threads=threads, n_batch=256, logits_all=True, verbose=False)
                logits = llama_cpp_logits(llm, ids[0].tolist())
                diff = float(abs(logits - ref_logits).max())
                top1 = float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())
                models[name][f"llama_cpp_{dtype}"] = {
                    "max_abs_logit_diff": diff, "logit_range": float(abs(ref_logits).max()), "top1_agreement": top1,
                    "file_mb": os.path.getsize(gguf) / 1e6}
                print(f"[{name}] llama.cpp {dtype}: max |logit diff| {diff:.3f} vs transformers, top-1 agreement "
                      f"{top1:.2f}", flush=True)
                runners[(name, dtype)] = timed_llama_cpp(llm, ids[0].tolist(), args.new_tokens)
    for (name, runtime), (rate, out) in best_rates(runners, args.new_tokens, args.rounds).items():
        key = "hf_fp32" if runtime == "hf" else f"llama_cpp_{runtime}"
        entry = models[name].setdefault(key, {})
        entry.update({"tokens_per_s": rate, "text": tok.decode(out[:24])})
        print(f"[{name}] {key}: {rate:.1f} tokens/s", flush=True)
    result["models"] = models
    result["llama_cpp"] = have_llama_cpp
    result["prompt"] = PROMPT
    write_result(args.out, "result.json", result)

    s, p = models["source"], models["pruned"]
    table = "| | source | pruned | pruned / source |\n|---|---|---|---|\n"
    table += f"| parameters | {s['params'] / 1e6:.1f}M | {p['params'] / 1e6:.1f}M | {p['params'] / s['params']:.2f} |\n"
    table += (f"| transformers fp32, tokens/s | {s['hf_fp32']['tokens_per_s']:.1f} | {p['hf_fp32']['tokens_per_s']:.1f} | "
              f"{p['hf_fp32']['tokens_per_s'] / s['hf_fp32']['tokens_per_s']:.2f} |\n")
    for dtype in ("f16", "q8_0"):
        key = f"llama_cpp_{dtype}"
        if key in s:
            table += (f"| llama.cpp {dtype}, tokens/s | {s[key]['tokens_per_s']:.1f} | {p[key]['tokens_per_s']:.1f} | "
                      f"{p[key]['tokens_per_s'] / s[key]['tokens_per_s']:.2f} |\n")
            table += (f"| llama.cpp {dtype} vs transformers: max abs logit diff (logit range) / top-1 agreement | "
                      f"{s[key]['max_abs_logit_diff']:.3f} ({s[key]['logit_range']:.0f}) / {s[key]['top1_agreement']:.2f} | "
                      f"{p[key]['max_abs_logit_diff']:.3f} ({p[key]['logit_range']:.0f}) / {p[key]['top1_agreement']:.2f} | |\n")
    if not have_llama_cpp:
        table += "| llama.cpp | not installed (pip install llama-cpp-python==0.3.36) | | |\n"
    peak = result["peak_gflops"]
    table += f"\nDense matmul peak (2048^3, {threads} threads): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s.\n"
    if "training" in result:
        t = result["training"]
        table += (f"Training (plain bf16 step of the source, from `{args.overhead}`): {t['tokens_per_s']:.0f} tokens/s = "
                  f"{t['gflops']:.0f} GFLOP/s of model FLOPs, {100 * t['fraction_of_bf16_peak']:.0f}% of the bf16 matmul peak.\n")
    if have_llama_cpp:
        table += (f"\nGreedy text after {PROMPT!r} — source (llama.cpp f16): {s['llama_cpp_f16']['text']!r}; "
                  f"pruned (llama.cpp f16): {p['llama_cpp_f16']['text']!r}; pruned (transformers): {p['hf_fp32']['text']!r}.\n")
    notes = (f"Batch 1, greedy, {args.new_tokens} new tokens after a {ids.shape[1]}-token prompt; best of "
             f"{args.rounds} runs after a warm-up, the runtimes taking turns in every round; source `{args.source}`, pruned `{args.pruned}`.")
    print(append_section(args.benchmarks_md, "Speed: inference at the edge, training vs peak", command_line(),
                         table, notes))


if __name__ == "__main__":
    main()
