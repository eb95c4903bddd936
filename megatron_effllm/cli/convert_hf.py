"""Convert a megatron checkpoint folder back into a Hugging Face model folder.

    effllm-convert-hf --ckpt CKPT_DIR --out HF_DIR --dtype bf16

A uniform model becomes a stock Llama/Qwen2/Mistral folder; a pruned, non-uniform one gets
per-layer config fields and its model class (load with trust_remote_code=True). The tokenizer
stored in the checkpoint is copied along. The checkpoint is read in this one process, whatever
TP/PP layout wrote it. Nothing is written to --out unless the conversion succeeds; --overwrite
replaces only a folder a megatron_effllm tool wrote, once the new one is complete.
"""
import argparse
import time

from megatron_effllm import output_dir
from megatron_effllm.cli import TORCH_DTYPES, shutdown_process_group
from megatron_effllm.convert.hf_io import needs_remote_code, save_hf_model
from megatron_effllm.convert.megatron_checkpoint import load_canonical_checkpoint
from megatron_effllm.errors import cli_entry
from megatron_effllm.log import get_logger, setup_logging

log = get_logger(__name__)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="effllm-convert-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True, metavar="DIR",
                    help="megatron checkpoint folder (written by effllm-convert-megatron or training)")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="Hugging Face model folder to create (must not exist, unless --overwrite)")
    ap.add_argument("--dtype", choices=tuple(TORCH_DTYPES), default="bf16",
                    help="weight precision of the exported safetensors (default: bf16)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if an earlier run of a megatron_effllm tool wrote it "
                         "(the new folder is complete before the old one is removed)")
    return ap.parse_args(argv)


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    out = output_dir.check_output(args.out, inputs=[args.ckpt], overwrite=args.overwrite)
    start = time.time()
    arch, state_dict, tokenizer_dir = load_canonical_checkpoint(args.ckpt)
    save_hf_model(arch, state_dict, out, tokenizer_dir=tokenizer_dir, dtype=TORCH_DTYPES[args.dtype],
                  overwrite=args.overwrite)
    kind = "non-uniform (trust_remote_code=True)" if needs_remote_code(arch) else "stock config"
    log.info(
        f"wrote {out}: {arch.family}, {arch.num_layers} layers, {arch.num_params() / 1e6:.1f}M "
        f"parameters, {args.dtype}, {kind} ({time.time() - start:.1f}s)"
    )


def command():
    """The console script: the conversion, then the end of the process group it started."""
    main()
    shutdown_process_group()


if __name__ == "__main__":
    command()
