"""One-GPU check of the paths CPU runs cannot prove, written as one JSON.

    python tools/gpu_check.py --out gpu_check.json            # on one GPU, ~5-8 minutes
    python tools/gpu_check.py --out smoke.json --smoke         # tiny shapes: the CPU-runnable parts

Sections (each runs on its own; a failure is recorded with its error and the next one runs):

* ``env``: torch / CUDA / NCCL / DeepSpeed / megatron-core versions, the GPU, whether
  TransformerEngine imports, the measured bf16 matmul peak (the MFU denominator).
* ``tiny_e2e``: the tiny config at world size 1 (NCCL on a GPU) in a fresh process: held-out
  loss, prune events, compactions, checkpoints; then a second fresh process resumes it.
* ``plain_megatron``: a Llama-3.2-1B-shaped random model (bf16, seq 2048), a plain megatron-core
  step (DistributedDataParallel + DistributedOptimizer + forward_backward_no_pipelining):
  tokens/s and MFU. The reference the trainer is measured against.
* ``trainer``: the same shape through this trainer in-process, with ``strategy=none`` and inside
  the pruning window (tokens/s and MFU per step kind), the peak memory of a compaction and the
  memory returned after it, and the device->host synchronisations of pruning-window steps
  (``torch.cuda.set_sync_debug_mode``; GPU only).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_effllm.architecture import Architecture  # noqa: E402
from megatron_effllm.training import trainer as trainer_mod  # noqa: E402
from megatron_effllm.training.config import load_config  # noqa: E402
from megatron_effllm.training.metrics import read_metrics  # noqa: E402

GPU = torch.cuda.is_available()
# Llama-3.2-1B's shape (random weights; the smollm2 tokenizer's ids fit its vocabulary).
LLAMA_1B = dict(num_layers=16, hidden_size=2048, num_heads=32, num_kv_groups=8, ffn_hidden_size=8192,
                vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0)
SMOKE = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_groups=2, ffn_hidden_size=128,
             vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0)


def section(results: dict, name: str, fn, *args) -> None:
    t0 = time.time()
    try:
        results[name] = {"ok": True, **fn(*args)}
    except BaseException as err:  # recorded, then the next section runs
        if isinstance(err, KeyboardInterrupt):
            raise
        results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc()[-4000:]}
    results[name]["seconds"] = round(time.time() - t0, 1)
    print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else results[name]['error']}", flush=True)


def matmul_peak_tflops(n: int, repeats: int) -> float:
    dtype = torch.bfloat16
    dev = "cuda" if GPU else "cpu"
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    sync()
    t0 = time.time()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n ** 3 * repeats / (time.time() - t0) / 1e12


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def env_section(smoke: bool) -> dict:
    import deepspeed
    import megatron.core

    from megatron_effllm.model.builder import te_available

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
           "megatron_core": getattr(megatron.core, "__version__", "?"), "gpu": None, "nccl": None,
           "transformer_engine": te_available()}
    if GPU:
        out["gpu"] = torch.cuda.get_device_name(0)
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        out["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    out["bf16_matmul_peak_tflops"] = round(matmul_peak_tflops(256 if smoke else 8192, 3 if smoke else 50), 2)
    return out


def _train_process(args: list, log_path: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    with open(log_path, "a") as log:
        return subprocess.call([sys.executable, "-m", "megatron_effllm.cli.train", *args], cwd=ROOT,
                               env=env, stdout=log, stderr=subprocess.STDOUT)


def tiny_e2e_section(work: str) -> dict:
    run_dir = os.path.join(work, "tiny")
    log_path = os.path.join(work, "tiny.log")
    common = ["--config", "configs/tiny_cpu.yaml", f"run_dir={run_dir}", "prune.start_step=2",
              "prune.end_step=12", "prune.compact_every=5", "train.checkpoint_interval=10",
              "train.eval_interval=10", "train.log_interval=1", "export.hf=false",
              f"model.dtype={'bf16' if GPU else 'fp32'}"]
    first = _train_process(common + ["train.steps=20", "resume=none"], log_path)
    second = _train_process(common + ["train.steps=24", "resume=auto"], log_path)
    records = read_metrics(run_dir)
    evals = [r["heldout_loss"] for r in records if r.get("kind") in ("eval", "summary") and "heldout_loss" in r]
    with open(log_path, errors="replace") as f:
        log_text = f.read()
    summary = [r for r in records if r.get("kind") == "summary"]
    return {"exit_codes": [first, second], "resumed": "[resume] continuing" in log_text,
            "compactions": sum(r.get("kind") == "compaction" for r in records),
            "heldout_losses_finite": bool(evals) and all(
                v == v and abs(v) != float("inf") for e in evals for v in e.values()),
            "final_params": summary[-1].get("final_params") if summary else None,
            "log_tail": log_text[-3000:] if (first or second) else ""}


def _flops_per_token(arch: Architecture, seq: int) -> float:
    """Training FLOPs per token: 6 per parameter plus attention's 12 * layers * hidden * seq."""
    return 6.0 * arch.num_params() + 12.0 * arch.num_layers * arch.hidden_size * seq


def plain_megatron_section(shape: dict, seq: int, micro: int, steps: int, peak: float) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_effllm.model.builder import build_gpt_model
    from megatron_effllm.parallel.runtime import cpu_device_mode, init_model_parallel

    arch = Architecture.uniform(**shape)
    init_model_parallel(tp=1, pp=1)
    dtype = torch.bfloat16 if GPU else torch.float32
    model = build_gpt_model(arch, params_dtype=dtype, use_te=False)
    # megatron's optimizers allocate on "cuda" (a null context on a GPU); its DistributedOptimizer
    # takes CUDA parameters only (and its clipping CUDA gradients), so the CPU smoke run checks
    # this code with the plain optimizer, unclipped.
    with cpu_device_mode():
        ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=GPU, overlap_grad_reduce=False))
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, bf16=GPU,
                                                     use_distributed_optimizer=GPU, clip_grad=1.0 if GPU else 0.0), [ddp])
    dev = torch.cuda.current_device() if GPU else "cpu"
    tokens = torch.randint(0, arch.vocab_size, (micro, seq + 1), device=dev)
    position_ids = torch.arange(seq, device=dev).unsqueeze(0).expand(micro, seq)

    def forward_step(data_iterator, model):
        out = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    fwd_bwd = get_forward_backward_func()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.time()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fwd_bwd(forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp], num_microbatches=1,
                seq_length=seq, micro_batch_size=micro, forward_only=False)
        with cpu_device_mode():
            opt.step()
        sync()
        times.append(time.time() - t0)
    per_step = statistics.median(times[1:] if len(times) > 1 else times)
    tps = micro * seq / per_step
    return {"params": arch.num_params(), "seq": seq, "micro_batch": micro, "distributed_optimizer": GPU,
            "tokens_per_s": round(tps, 1),
            "mfu": round(tps * _flops_per_token(arch, seq) / (peak * 1e12), 4) if peak else None}


class _Probe:
    """Around the trainer's internals: memory of each compaction and the host syncs of steps
    inside the pruning window (CUDA's sync debug mode warns on every synchronising call)."""

    def __init__(self):
        self.compactions, self.window_syncs = [], []

    @contextlib.contextmanager
    def installed(self):
        from megatron_effllm.training import faults
        from megatron_effllm.training.runtime.saliency_runtime import SaliencyRuntime

        # a step starts with the pruning runtime's start_step and ends with the guard's finish_step
        trainer_cls, guard_cls = trainer_mod.Trainer, faults.StepGuard
        compact, begin, finish = trainer_cls._compact, SaliencyRuntime.start_step, guard_cls.finish_step
        probe = self

        def measured_compact(self_, *args, **kwargs):
            if not GPU:
                return compact(self_, *args, **kwargs)
            sync()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = compact(self_, *args, **kwargs)
            sync()
            probe.compactions.append({"before_gb": before / 2**30,
                                      "peak_extra_gb": (torch.cuda.max_memory_allocated() - before) / 2**30,
                                      "after_gb": torch.cuda.memory_allocated() / 2**30})
            return out

        def begin_step(self_, in_window, *args, **kwargs):
            probe._catch = None
            if GPU and in_window:
                probe._catch = warnings.catch_warnings(record=True)
                probe._seen = probe._catch.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            return begin(self_, in_window, *args, **kwargs)

        def finish_step(self_, *args, **kwargs):
            out = finish(self_, *args, **kwargs)
            if probe._catch is not None:
                torch.cuda.set_sync_debug_mode("default")
                probe.window_syncs.append(sum("synchroniz" in str(w.message) for w in probe._seen))
                probe._catch.__exit__(None, None, None)
                probe._catch = None
            return out

        trainer_cls._compact, SaliencyRuntime.start_step, guard_cls.finish_step = measured_compact, begin_step, finish_step
        try:
            yield self
        finally:
            trainer_cls._compact, SaliencyRuntime.start_step, guard_cls.finish_step = compact, begin, finish


def _trainer_run(work: str, name: str, shape: dict, seq: int, micro: int, steps: int, overrides: list) -> list:
    cfg_path = os.path.join(work, f"{name}.yaml")
    with open(cfg_path, "w") as f:
        json.dump({"run_dir": os.path.join(work, name), "resume": "none", "seed": 1,
                   "model": {"source": "", "init": shape, "tokenizer": "smollm2-135m",
                             "dtype": "bf16" if GPU else "fp32"},
                   "parallel": {"tp": 1, "pp": 1, "zero_stage": 2},
                   "data": {"train": "builtin", "heldout": "builtin", "eos_token": "<|endoftext|>", "seq_len": seq,
                            "micro_batch": micro, "global_batch": micro, "heldout_batches": 1},
                   "optim": {"lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 1},
                   "train": {"steps": steps, "log_interval": 1, "eval_interval": 10 ** 6,
                             "checkpoint_interval": 10 ** 6, "progress_bar": False},
                   "export": {"hf": False}}, f)  # JSON is YAML
    trainer_mod.run(load_config(cfg_path, overrides))
    return read_metrics(os.path.join(work, name))


def trainer_section(work: str, shape: dict, seq: int, micro: int, steps: int, peak: float) -> dict:
    arch = Architecture.uniform(**shape)
    flops = _flops_per_token(arch, seq)

    def rate(records, lo, hi):
        tps = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and lo < r["step"] <= hi]
        if not tps:
            return None
        median = statistics.median(tps)
        return {"tokens_per_s": round(median, 1), "mfu": round(median * flops / (peak * 1e12), 4) if peak else None}

    plain = _trainer_run(work, "none", shape, seq, micro, steps, ["prune.strategy=none"])
    window_end = steps - 1
    probe = _Probe()
    with probe.installed():
        pruned = _trainer_run(work, "window", shape, seq, micro, steps, [
            "prune.strategy=efficientllm", "prune.target_params=0.9", "prune.start_step=1",
            f"prune.end_step={window_end}", f"prune.interval={max(window_end - 2, 1)}",
            f"prune.compact_every={max(window_end - 2, 1)}"])
    return {"params": arch.num_params(), "seq": seq, "micro_batch": micro,
            "strategy_none": rate(plain, 1, steps),
            "pruning_window": rate(pruned, 1, window_end),
            "compactions": probe.compactions,
            "host_syncs_per_window_step": probe.window_syncs if GPU else "needs a GPU"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU-runnable check of this script)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    shape, seq, micro, steps = (SMOKE, 32, 2, 4) if args.smoke else (LLAMA_1B, 2048, 4, 12)
    results: dict = {"smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory() if args.work is None else contextlib.nullcontext(args.work) as work:
        os.makedirs(work, exist_ok=True)
        section(results, "env", env_section, args.smoke)
        peak = results["env"].get("bf16_matmul_peak_tflops")
        section(results, "tiny_e2e", tiny_e2e_section, work)
        section(results, "plain_megatron", plain_megatron_section, shape, seq, micro, steps, peak)
        section(results, "trainer", trainer_section, work, shape, seq, micro, steps, peak)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({k: v.get("ok") if isinstance(v, dict) else v for k, v in results.items()}))
    return 0 if all(v.get("ok") for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
