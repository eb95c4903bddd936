"""effllm-evaluate (megatron_effllm.cli.evaluate) on saved tiny models (stock and trust_remote_code), and its one-line errors."""
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

from eval_fixtures import tiny_llama, tiny_tokenizer
from megatron_effllm.cli import evaluate as evaluate_cli
from megatron_effllm.eval.perplexity import heldout_perplexity
from megatron_effllm.eval.zero_shot import evaluate_task

TOOL = ["-m", "megatron_effllm.cli.evaluate"]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny stock Llama folder, its in-memory twin, and a held-out file."""
    out = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    model.save_pretrained(out / "hf")
    tok.save_pretrained(out / "hf")
    heldout = out / "prose.heldout.jsonl.gz"
    with gzip.open(heldout, "wt") as f:
        for t in ("the quick brown fox jumps over the lazy dog. " * 8, "Sarah was a much better surgeon. " * 6):
            f.write(json.dumps({"text": t}) + "\n")
    return {"dir": str(out / "hf"), "model": model, "tok": tok, "heldout": str(heldout)}


def test_cli_writes_table_and_json_equal_to_the_library(saved, tmp_path):
    out = tmp_path / "res.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, *TOOL, "--model", saved["dir"], "--tasks", "arc_easy,winogrande", "--limit", "5",
         "--batch-size", "3", "--ppl", saved["heldout"], "--ppl-windows", "2", "--ppl-seq-len", "16",
         "--threads", "1", "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    for name in ("arc_easy", "winogrande"):
        want = evaluate_task(saved["model"], saved["tok"], name, limit=5, batch_size=3)
        got = report["tasks"][name]
        assert got["n"] == 5 and got["acc"] == want["acc"] and got.get("acc_norm") == want.get("acc_norm")
        assert f"{name:<15}" in res.stdout
    want_ppl = heldout_perplexity(saved["model"], saved["tok"], {"prose": saved["heldout"]}, windows=2, seq_len=16)
    assert report["perplexity"]["domains"]["prose"] == pytest.approx(want_ppl["prose"], rel=1e-5)
    assert report["perplexity"]["geometric_mean"] == pytest.approx(want_ppl["prose"], rel=1e-5)
    assert report["paper7_average"] is None and report["dtype"] == "fp32" and report["limit"] == 5
    assert "geo-mean" in res.stdout and "prose" in res.stdout


def test_cli_evaluates_a_non_uniform_remote_code_export(saved, tmp_path):
    from megatron_effllm.architecture import Architecture, LayerShape
    from megatron_effllm.convert import hf_io

    tok = saved["tok"]
    arch = Architecture.uniform(num_layers=2, hidden_size=32, num_heads=4, num_kv_groups=2, ffn_hidden_size=64,
                                vocab_size=len(tok), max_position_embeddings=256)
    arch = arch.with_layers([LayerShape(4, 2, 48, 0), LayerShape(2, 1, 24, 1)])
    torch.manual_seed(3)
    model = hf_io.build_hf_model(arch)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    tok.save_pretrained(tmp_path / "tok")
    hf_io.save_hf_model(arch, hf_io.canonical_state_dict(model), str(tmp_path / "pruned"),
                        tokenizer_dir=str(tmp_path / "tok"), dtype=torch.float32)
    report = evaluate_cli.main(["--model", str(tmp_path / "pruned"), "--trust-remote-code", "--tasks", "piqa",
                                "--limit", "4", "--quiet"])
    want = evaluate_task(model, tok, "piqa", limit=4)
    assert report["tasks"]["piqa"]["acc"] == want["acc"] and report["tasks"]["piqa"]["acc_norm"] == want["acc_norm"]
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    # without the flag: one line that says what to pass
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(["--model", str(tmp_path / "pruned"), "--tasks", "piqa"])
    assert exc.value.code == 2


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model", "--tasks", "piqa"], "model /nonexistent/model not found"),
    (["--model", "{dir}", "--tasks", "piqa,mmlu"], "unknown task 'mmlu'"),
    (["--model", "{dir}"], "nothing to evaluate"),
    (["--model", "{dir}/config.json", "--tasks", "piqa"], "is a file but not a .gguf"),
    (["--model", "{dir}", "--ppl", "/nonexistent.jsonl"], "perplexity file /nonexistent.jsonl not found"),
    (["--model", "{dir}", "--tasks", "piqa", "--limit", "0"], "--limit must be at least 1"),
])
def test_cli_errors_are_one_line_exit_2(saved, capsys, args, message):
    args = [a.format(dir=saved["dir"]) for a in args]
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_bad_model_path_subprocess():
    res = subprocess.run([sys.executable, *TOOL, "--model", "/nonexistent/model", "--tasks", "paper7"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: model /nonexistent/model not found; pass a Hugging Face model folder or a .gguf file"]
