"""The command-line programs (console scripts declared in pyproject.toml).

| console script | module | what |
|---|---|---|
| ``effllm-train`` | ``cli.train`` | pruning-aware pretraining (what the launchers start) |
| ``effllm-convert-megatron`` | ``cli.convert_megatron`` | HF folder or GGUF -> megatron checkpoint |
| ``effllm-convert-hf`` | ``cli.convert_hf`` | megatron checkpoint -> HF folder |
| ``effllm-export-gguf`` | ``cli.export_gguf`` | HF folder -> GGUF for llama.cpp |
| ``effllm-evaluate`` | ``cli.evaluate`` | held-out perplexity and zero-shot accuracy |
| ``effllm-preprocess`` | ``cli.preprocess`` | text -> megatron-core indexed datasets |
| ``effllm-plan`` | ``cli.plan`` | dry run: per-rank parameters, memory, checkpoint bytes, launch lines |

Each module's ``main(argv)`` is what the console script runs (``python -m megatron_effllm.cli.X``
runs the same); a bad input ends with one ``error:`` line and exit code 2 (``errors.cli_entry``).
Results a user reads or pipes (tables, summaries) are printed to stdout; progress and status go
through the package logger (``log.setup_logging``).
"""
import warnings

# megatron-core warns at import about optional fused kernels (TransformerEngine, Apex) that the
# commands run without; set here, before any command module imports megatron.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# --dtype choices of the converters
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shutdown_process_group() -> None:
    """End the one-process group a conversion started. Only for the command line: a caller of
    ``main`` keeps its own process group (and megatron's groups built on it)."""
    if dist.is_initialized():
        dist.destroy_process_group()
