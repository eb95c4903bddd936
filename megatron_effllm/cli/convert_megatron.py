"""Convert a Hugging Face Llama-family model (folder or .gguf) into a megatron checkpoint folder.

    effllm-convert-megatron --hf HF_DIR_OR_GGUF --out CKPT_DIR --tp 2 --pp 1

The checkpoint is megatron-core dist_checkpointing (global tensors, layout-free keys) plus
architecture.json and the tokenizer, so it loads at any TP/PP; --tp/--pp are checked against the
model (heads, KV groups, FFN widths and vocabulary divisible by TP; at least PP layers) and
recorded as the layout the checkpoint is meant for. The conversion runs in this one process.
Nothing is written to --out unless the conversion succeeds; --overwrite replaces only a folder a
megatron_effllm tool wrote, once the new one is complete.
"""
import argparse
import time

import torch

from megatron_effllm import output_dir
from megatron_effllm.cli import TORCH_DTYPES, shutdown_process_group
from megatron_effllm.convert.hf_io import load_hf_model
from megatron_effllm.convert.megatron_checkpoint import check_layout, save_canonical_checkpoint
from megatron_effllm.errors import cli_entry
from megatron_effllm.log import get_logger, setup_logging

log = get_logger(__name__)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="effllm-convert-megatron", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hf", required=True, metavar="DIR_OR_GGUF",
                    help="Hugging Face model folder (config.json + safetensors) or a .gguf file")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="checkpoint folder to create (must not exist, unless --overwrite)")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor parallel size the checkpoint is meant for (default: 1)")
    ap.add_argument("--pp", type=int, default=1,
                    help="pipeline parallel size the checkpoint is meant for (default: 1)")
    ap.add_argument("--dtype", choices=tuple(TORCH_DTYPES), default="fp32",
                    help="weight precision stored in the checkpoint (default: fp32)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if an earlier run of a megatron_effllm tool wrote it "
                         "(the new folder is complete before the old one is removed)")
    return ap.parse_args(argv)


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    out = output_dir.check_output(args.out, inputs=[args.hf], overwrite=args.overwrite)
    start = time.time()
    src = load_hf_model(args.hf, dtype=torch.float32)
    check_layout(src.arch, args.tp, args.pp)
    with output_dir.write_folder(out, kind="megatron_checkpoint", overwrite=args.overwrite) as stage:
        save_canonical_checkpoint(src.arch, src.state_dict, stage, src.tokenizer_dir,
                                  dtype=TORCH_DTYPES[args.dtype], tp=args.tp, pp=args.pp)
    log.info(
        f"wrote {out}: {src.arch.family}, {src.arch.num_layers} layers, "
        f"{src.arch.num_params() / 1e6:.1f}M parameters, {args.dtype}, "
        f"for TP={args.tp} PP={args.pp} ({time.time() - start:.1f}s)"
    )


def command():
    """The console script: the conversion, then the end of the process group it started."""
    main()
    shutdown_process_group()


if __name__ == "__main__":
    command()
