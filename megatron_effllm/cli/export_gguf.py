"""Export a Hugging Face model folder to a GGUF file for llama.cpp.

    effllm-export-gguf --hf runs/pruned/hf --out pruned-f16.gguf
    effllm-export-gguf --hf .cache/assets/smollm2-135m-hf --out smollm2-q8_0.gguf \\
        --dtype q8_0 --tokenizer-gguf SmolLM2-135M-Instruct.Q4_1.gguf

Works for stock Llama / Mistral / Qwen2 folders and for this project's non-uniform exports
(per-layer widths are written as llama.cpp's "deci" architecture). The tokenizer comes from the
folder, or is copied from --tokenizer-gguf (recommended when the model was converted from a
GGUF: it keeps llama.cpp's pre-tokenizer name).
"""
import argparse
import os

from megatron_effllm import output_dir
from megatron_effllm.convert.gguf_export import export_gguf, is_exported_gguf
from megatron_effllm.errors import cli_entry
from megatron_effllm.log import get_logger, setup_logging

log = get_logger(__name__)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="effllm-export-gguf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--dtype", default="f16", choices=("f32", "f16", "q8_0"),
                    help="precision of the 2-D weights (norms stay f32; default f16)")
    ap.add_argument("--tokenizer-gguf", default=None,
                    help="copy the tokenizer metadata from this GGUF instead of converting the folder's")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is a GGUF this tool exported (atomically, once the new one is complete)")
    return ap.parse_args(argv)


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    output_dir.check_output(args.out, inputs=[args.hf, args.tokenizer_gguf], overwrite=args.overwrite,
                            file_owned=is_exported_gguf)
    arch_name = export_gguf(args.hf, args.out, dtype=args.dtype, tokenizer_gguf=args.tokenizer_gguf,
                            overwrite=args.overwrite)
    log.info(f"wrote {args.out} ({arch_name} architecture, {args.dtype}, "
             f"{os.path.getsize(args.out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
