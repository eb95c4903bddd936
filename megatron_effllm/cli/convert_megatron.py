"""Convert a Hugging Face Llama-family model (folder or .gguf) into a megatron checkpoint folder.

    effllm-convert-megatron --hf HF_DIR_OR_GGUF --out CKPT_DIR --tp 2 --pp 1

The checkpoint is megatron-core dist_checkpointing (global tensors, layout-free keys) plus
architecture.json and the tokenizer, so it loads at any TP/PP; --tp/--pp are checked against the
model (heads, KV groups, FFN widths and vocabulary divisible by TP; at least PP layers) and
recorded as the layout the checkpoint is meant for. The conversion runs in this one process.
Nothing is written to --out unless the conversion succeeds.
"""
import argparse
import os
import time
import warnings

# megatron-core warns at import about optional fused kernels that a conversion never uses.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

import torch  # noqa: E402

from megatron_effllm.cli import shutdown_process_group  # noqa: E402
from megatron_effllm.convert.hf_io import load_hf_model  # noqa: E402
from megatron_effllm.convert.megatron_checkpoint import check_layout, save_canonical_checkpoint  # noqa: E402
from megatron_effllm.errors import UserError, cli_entry  # noqa: E402
from megatron_effllm.log import get_logger, setup_logging  # noqa: E402

log = get_logger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="effllm-convert-megatron", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hf", required=True, metavar="DIR_OR_GGUF",
                    help="Hugging Face model folder (config.json + safetensors) or a .gguf file")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="checkpoint folder to create (must not exist)")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor parallel size the checkpoint is meant for (default: 1)")
    ap.add_argument("--pp", type=int, default=1,
                    help="pipeline parallel size the checkpoint is meant for (default: 1)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                    help="weight precision stored in the checkpoint (default: fp32)")
    return ap.parse_args(argv)


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        raise UserError(f"--out {out} already exists; choose a new folder or remove it")
    start = time.time()
    src = load_hf_model(args.hf, dtype=torch.float32)
    check_layout(src.arch, args.tp, args.pp)
    save_canonical_checkpoint(
        src.arch, src.state_dict, out, src.tokenizer_dir, dtype=DTYPES[args.dtype], tp=args.tp, pp=args.pp
    )
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
