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

llama.cpp is optional: ``pip install llama-cpp-python==0.3.36`` (it compiles llama.cpp, several
minutes); without it those rows are skipped and say so. Writes OUT/result.json and appends a
section to BENCHMARKS.md.
"""
import argparse
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


@cli_entry
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="smollm2-135m", help="HF folder, or smollm2-135m")
    ap.add_argument("--pruned", required=True, help="the pruned model's HF folder")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per model and runtime (the best counts)")
    ap.add_argument("--overhead", default="runs/bench_overhead/result.json",
                    help="result.json of tools/bench_training_overhead.py (training throughput row)")
    ap.add_argument("--out", default="runs/bench_speed")
    ap.add_argument("--benchmarks-md", default="BENCHMARKS.md")
    args = ap.parse_args(argv)
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
