"""Tokenize raw text into megatron-core indexed datasets (PREFIX.bin / PREFIX.idx).

    effllm-preprocess --input corpus/ --tokenizer model.gguf --out-prefix data/train
    effllm-preprocess --input a.jsonl.gz b.parquet hf_folder/ \\
        --tokenizer hf_model/ --out-prefix data/mix --split-by-domain --workers 4

Inputs: .jsonl / .json (JSON lines, optionally .gz), .parquet, HF `datasets` folders, or folders
holding them. One document per record (field --text-key), EOS appended. With --split-by-domain
each domain (field --domain-key, else the input file's name) is written to PREFIX_<domain>, and
PREFIX.domains.json lists them (usable as the run config's data.train).
"""
import argparse

from megatron_effllm.data.preprocess import preprocess
from megatron_effllm.errors import cli_entry
from megatron_effllm.log import get_logger, setup_logging

log = get_logger(__name__)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="effllm-preprocess", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_DIR",
                    help="jsonl / jsonl.gz / parquet files, HF datasets folders, or folders of them")
    ap.add_argument("--tokenizer", required=True,
                    help="HF tokenizer folder, .gguf file, sentencepiece .model, or smollm2-135m")
    ap.add_argument("--out-prefix", required=True, help="output prefix: writes PREFIX.bin/.idx")
    ap.add_argument("--text-key", default="text", help="record field holding the text (default: text)")
    ap.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="end every document with the EOS token (default: on)")
    ap.add_argument("--prepend-bos", action="store_true",
                    help="start every document with the BOS token (Llama-2 style data)")
    ap.add_argument("--eos-token", default=None,
                    help="token that ends a document, if not the tokenizer's EOS "
                         "(e.g. '<|endoftext|>' for an instruct model)")
    ap.add_argument("--split-by-domain", action="store_true",
                    help="one output prefix per domain: PREFIX_<domain>")
    ap.add_argument("--domain-key", default="domain",
                    help="record field naming the domain (default: domain; else the file name)")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


@cli_entry
def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    summary = preprocess(
        args.input, args.tokenizer, args.out_prefix, text_key=args.text_key,
        append_eos=args.append_eos, prepend_bos=args.prepend_bos,
        split_by_domain=args.split_by_domain, domain_key=args.domain_key,
        workers=args.workers, eos_token=args.eos_token, progress=not args.quiet,
    )
    for name, out in summary["outputs"].items():
        log.info(f"{out['prefix']}: {out['documents']} documents, {out['tokens']} tokens"
                 + (f" (domain {name})" if args.split_by_domain else ""))
    if args.split_by_domain:
        log.info(f"domain manifest: {args.out_prefix}.domains.json")
    log.info(f"{summary['tokens']} tokens in {summary['seconds']:.1f} s "
             f"({summary['tokens_per_s']:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
