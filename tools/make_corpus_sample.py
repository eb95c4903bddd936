"""Cut the small corpus slice shipped in megatron_effllm/data/samples/ from the full corpus.

Usage: python tools/make_corpus_sample.py --corpus DIR [--train-bytes N] [--heldout-bytes N]

DIR holds <domain>.{train,heldout}.jsonl.gz with {"text", "domain", "source"} lines. Whole
documents are taken in file order until the byte budget is met; the last one is cut at a
paragraph boundary. The slice is deterministic, so it can be rebuilt and checked.
"""
import argparse
import gzip
import json
import os

DOMAINS = ("books", "techdocs", "man", "code")
OUT = os.path.join(os.path.dirname(__file__), "..", "megatron_effllm", "data", "samples")


def take(path, budget):
    out, used = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            text = doc["text"]
            if used + len(text) > budget:
                cut = text[: budget - used]
                cut = cut[: cut.rfind("\n\n")] if "\n\n" in cut else cut
                if len(cut) > 2000:
                    out.append({**doc, "text": cut})
                break
            out.append(doc)
            used += len(text)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--train-bytes", type=int, default=1_000_000)
    ap.add_argument("--heldout-bytes", type=int, default=120_000)
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    for dom in DOMAINS:
        for split, budget in (("train", args.train_bytes), ("heldout", args.heldout_bytes)):
            docs = take(os.path.join(args.corpus, f"{dom}.{split}.jsonl.gz"), budget)
            dst = os.path.join(OUT, f"{dom}.{split}.jsonl.gz")
            with gzip.GzipFile(dst, "wb", mtime=0) as f:
                for d in docs:
                    f.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
            print(dst, len(docs), "docs", sum(len(d["text"]) for d in docs), "chars")


if __name__ == "__main__":
    main()
