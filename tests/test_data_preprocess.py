"""Tokenizers and raw text -> megatron-core indexed datasets.

The real-tokenizer tests use SmolLM2-135M's tokenizer from its GGUF (loaded once per module);
the rest use a tiny sentencepiece model trained here on a few KB of the shipped corpus.
"""
import gzip
import json
import os
import warnings

import numpy
import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from megatron_effllm.assets import corpus_files, smollm2_gguf  # noqa: E402
from megatron_effllm.data.preprocess import preprocess, read_meta  # noqa: E402
from megatron_effllm.data.tokenizer import load_tokenizer  # noqa: E402
from megatron_effllm.errors import UserError  # noqa: E402


def read_docs(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    text = []
    for path in corpus_files("train").values():
        text.append(read_docs(path)[0]["text"][:3000])
    prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter("\n".join(text).splitlines()), model_prefix=prefix,
        vocab_size=200, model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="module")
def sp_tok(sp_model):
    return load_tokenizer(sp_model)


def write_jsonl(path, records, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return str(path)


def small_records(n=40):
    out = []
    for domain, path in corpus_files("train").items():
        for rec in read_docs(path)[:3]:
            text = rec["text"]
            for k in range(n // 4):
                out.append({"text": text[k * 500:(k + 1) * 500], "domain": domain})
    return [r for r in out if r["text"]]


# --- tokenizers ---

def test_gguf_tokenizer_is_smollm2(smol):
    from megatron_effllm.data.tokenizer import HFTokenizer

    assert smol.vocab_size == 49152 and smol.kind == "hf"
    assert smol.eos_id == 2  # the instruct model's EOS, <|im_end|>
    text = "def main():\n    print('Hello, world!')  # naïve café\n"
    ids = smol.encode(text)
    assert ids == smol.hf(text, add_special_tokens=False)["input_ids"]
    assert ids[0] != smol.bos_id and ids[-1] != smol.eos_id and len(ids) > 10
    assert smol.decode(ids) == text
    assert smol.encode_batch([text, "abc"]) == [ids, smol.encode("abc")]
    # An instruct model's EOS is its end-of-turn; pretraining documents end with <|endoftext|>.
    assert HFTokenizer(smol.hf, smol.path, smol.name, eos_token="<|endoftext|>").eos_id == 0
    with pytest.raises(UserError, match="no token '<nope>'"):
        HFTokenizer(smol.hf, smol.path, smol.name, eos_token="<nope>")


def test_hf_tokenizer_folder(smol, tmp_path):
    smol.hf.save_pretrained(str(tmp_path / "hf"))
    folder = load_tokenizer(str(tmp_path / "hf"))
    text = "An HF tokenizer folder: tokenizer.json + tokenizer_config.json.\n"
    assert folder.encode(text) == smol.encode(text)
    assert (folder.vocab_size, folder.eos_id, folder.name) == (49152, 2, "hf")
    assert load_tokenizer(str(tmp_path / "hf" / "tokenizer.json")).encode(text) == smol.encode(text)


def test_sentencepiece_tokenizer(sp_model, sp_tok):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    text = "The quick brown fox jumps over the lazy dog."
    assert sp_tok.kind == "sentencepiece" and sp_tok.vocab_size == 200
    assert sp_tok.eos_id == sp.eos_id() == 2
    assert sp_tok.encode(text) == sp.encode(text) and len(sp_tok.encode(text)) > 5
    assert sp_tok.decode(sp_tok.encode(text)) == text


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing" / "tok.model"), "not found"),
    (lambda d: str(d), "has no tokenizer.json"),
    (lambda d: (d / "vocab.txt").write_text("a") and str(d / "vocab.txt"), "unknown type"),
    (lambda d: (d / "bad.model").write_bytes(b"not a model") and str(d / "bad.model"),
     "is not a sentencepiece model"),
    (lambda d: "", "no tokenizer given"),
])
def test_tokenizer_errors_are_one_line(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as err:
        load_tokenizer(make(tmp_path))
    assert "\n" not in str(err.value)


# --- preprocessing ---

def test_corpus_with_smollm2_gives_back_exact_ids(smol, tmp_path):
    files = list(corpus_files("train").values())
    summary = preprocess(files, smol, str(tmp_path / "corpus"), progress=False)
    per_file = [[r["text"] for r in read_docs(f)] for f in files]
    docs = [t for texts in per_file for t in texts]
    ds = IndexedDataset(str(tmp_path / "corpus"))
    assert len(ds) == len(docs) == summary["documents"]
    assert ds[0].dtype == numpy.uint16  # megatron's choice for a 49152-token vocabulary
    assert int(ds.sequence_lengths.sum()) == summary["tokens"]
    # The first and the last document of every domain, token for token.
    starts = numpy.cumsum([0] + [len(t) for t in per_file])
    chosen = sorted({int(i) for b, e in zip(starts[:-1], starts[1:]) for i in (b, e - 1)})
    expected = smol.encode_batch([docs[i] for i in chosen])
    for i, want in zip(chosen, expected):
        assert ds[i].tolist() == want + [smol.eos_id], f"document {i}"
    assert all(int(ds[i][-1]) == smol.eos_id for i in range(len(ds)))
    meta = read_meta(str(tmp_path / "corpus"))
    assert meta["tokenizer"]["vocab_size"] == 49152 and meta["tokenizer"]["eos_id"] == 2
    assert meta["documents"] == len(docs) and set(meta["domains"]) == set(corpus_files("train"))
    print(f"\n[throughput] SmolLM2 tokenizer, corpus sample: {summary['tokens']} tokens in "
          f"{summary['seconds']:.2f} s = {summary['tokens_per_s']:,.0f} tokens/s")


def test_parquet_and_hf_folder_match_jsonl(sp_tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = small_records()
    src = tmp_path / "src"
    src.mkdir()
    jl = write_jsonl(src / "docs.jsonl", records)
    jgz = write_jsonl(src / "docs.jsonl.gz", records, gz=True)
    pq.write_table(pa.table({"text": [r["text"] for r in records],
                             "domain": [r["domain"] for r in records]}), str(src / "docs.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(src / "hf"))
    outs = {}
    for name, inp in (("jsonl", jl), ("gz", jgz), ("parquet", str(src / "docs.parquet")),
                      ("hf", str(src / "hf"))):
        preprocess([inp], sp_tok, str(tmp_path / name), progress=False)
        outs[name] = (open(tmp_path / f"{name}.bin", "rb").read(),
                      open(tmp_path / f"{name}.idx", "rb").read())
    assert outs["jsonl"] == outs["gz"] == outs["parquet"] == outs["hf"]
    ds = IndexedDataset(str(tmp_path / "jsonl"))
    assert [ds[i].tolist() for i in range(len(ds))] == \
        [sp_tok.encode(r["text"]) + [sp_tok.eos_id] for r in records]


def test_workers_split_by_domain_and_eos_options(sp_tok, sp_model, tmp_path):
    records = small_records()
    inp = write_jsonl(tmp_path / "docs.jsonl", records)
    one = preprocess([inp], sp_tok, str(tmp_path / "w1"), progress=False)
    two = preprocess([inp], sp_model, str(tmp_path / "w2"), workers=2, progress=False)
    assert one["tokens"] == two["tokens"]
    assert open(tmp_path / "w1.bin", "rb").read() == open(tmp_path / "w2.bin", "rb").read()

    summary = preprocess([inp], sp_tok, str(tmp_path / "dom"), split_by_domain=True, progress=False)
    manifest = json.load(open(tmp_path / "dom.domains.json"))
    assert set(manifest) == set(corpus_files("train"))
    for domain, prefix in manifest.items():
        ds = IndexedDataset(prefix)
        want = [sp_tok.encode(r["text"]) + [sp_tok.eos_id] for r in records if r["domain"] == domain]
        assert [ds[i].tolist() for i in range(len(ds))] == want
        assert read_meta(prefix)["domain"] == domain
    assert sum(o["documents"] for o in summary["outputs"].values()) == len(records)

    # Without a domain field, the input's file name is the domain.
    a = write_jsonl(tmp_path / "alpha.jsonl", [{"text": "one two"}])
    b = write_jsonl(tmp_path / "beta.jsonl.gz", [{"text": "three"}], gz=True)
    s = preprocess([a, b], sp_tok, str(tmp_path / "byfile"), split_by_domain=True, progress=False)
    assert set(s["outputs"]) == {"alpha", "beta"}

    # (keep the IndexedDataset alive while reading: its arrays are views of its mmap)
    preprocess([a], sp_tok, str(tmp_path / "noeos"), append_eos=False, progress=False)
    noeos = IndexedDataset(str(tmp_path / "noeos"))
    assert noeos[0].tolist() == sp_tok.encode("one two")
    preprocess([a], sp_tok, str(tmp_path / "bos"), prepend_bos=True, progress=False)
    bos = IndexedDataset(str(tmp_path / "bos"))
    assert bos[0].tolist() == [sp_tok.bos_id] + sp_tok.encode("one two") + [sp_tok.eos_id]


def _bad_inputs(d):
    """(name, input path, message) for each kind of bad input; the bad record comes after
    enough good ones that output files are already being written when it is found."""
    good = [{"text": f"document number {i}"} for i in range(300)]
    lines = [json.dumps(r) for r in good]
    cases = []
    (d / "empty.jsonl").write_bytes(b"")
    cases.append(("empty", str(d / "empty.jsonl"), "holds no documents"))
    (d / "blank.jsonl").write_text("\n\n{\"text\": \"\"}\n")
    cases.append(("blank", str(d / "blank.jsonl"), "holds no documents"))
    (d / "latin1.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    cases.append(("latin1", str(d / "latin1.jsonl"), r"latin1.jsonl line 301: bytes are not valid UTF-8"))
    (d / "nokey.jsonl").write_text("\n".join(lines) + '\n{"body": "x"}\n')
    cases.append(("nokey", str(d / "nokey.jsonl"), r"nokey.jsonl line 301: no field 'text' \(fields: body\)"))
    (d / "badjson.jsonl").write_text("\n".join(lines) + "\n{not json\n")
    cases.append(("badjson", str(d / "badjson.jsonl"), "badjson.jsonl line 301: not valid JSON"))
    (d / "number.jsonl").write_text('{"text": 5}\n')
    cases.append(("number", str(d / "number.jsonl"), "line 1: field 'text' is int, expected a string"))
    (d / "notgz.jsonl.gz").write_bytes(b"plain text, not gzip")
    cases.append(("notgz", str(d / "notgz.jsonl.gz"), "not a valid gzip file"))
    (d / "data.csv").write_text("text\nhello\n")
    cases.append(("csv", str(d / "data.csv"), "unknown extension"))
    cases.append(("missing", str(d / "nope.jsonl"), "input .*nope.jsonl not found"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), str(d / "nocol.parquet"))
    cases.append(("parquet", str(d / "nocol.parquet"), "nocol.parquet: no field 'text'"))
    import datasets

    datasets.Dataset.from_list([{"body": "x"}]).save_to_disk(str(d / "hf_nocol"))
    cases.append(("hf", str(d / "hf_nocol"), "hf_nocol: no field 'text'"))
    two = datasets.Dataset.from_list([{"text": "x"}])
    datasets.DatasetDict({"train": two, "test": two}).save_to_disk(str(d / "hf_dict"))
    cases.append(("hf_dict", str(d / "hf_dict"), r"holds several splits \(train, test\)"))
    return cases


def test_bad_inputs_one_line_errors_and_no_partial_files(sp_tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    good = write_jsonl(src / "good.jsonl", [{"text": "kept as it was"}])
    preprocess([good], sp_tok, str(out / "data"), progress=False)
    before = {f: open(out / f, "rb").read() for f in os.listdir(out)}
    for name, path, message in _bad_inputs(src):
        for split in (False, True):
            with pytest.raises(UserError, match=message) as err:
                preprocess([good, path], sp_tok, str(out / "data"), split_by_domain=split,
                           progress=False)
            assert "\n" not in str(err.value), name
            now = {f: open(out / f, "rb").read() for f in os.listdir(out)}
            assert now == before, f"{name}: output folder changed"


def test_cli_one_line_error_and_success(sp_model, tmp_path, capsys):
    from megatron_effllm.cli import preprocess as cli

    inp = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}, {"text": "general"}])
    with pytest.raises(SystemExit) as ex:
        cli.main(["--input", inp, "--tokenizer", str(tmp_path / "none.model"),
                  "--out-prefix", str(tmp_path / "x")])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tokenizer") and "not found" in err and "\n" not in err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("x")]
    cli.main(["--input", inp, "--tokenizer", sp_model, "--out-prefix", str(tmp_path / "x"),
              "--quiet"])
    assert "2 documents" in capsys.readouterr().out
    assert len(IndexedDataset(str(tmp_path / "x"))) == 2
