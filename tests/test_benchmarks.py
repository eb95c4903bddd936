"""The benchmark scripts' pure parts: the report writer and the scale-on-paper traffic model."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def test_report_sections_are_appended_with_command_and_machine(tmp_path):
    from megatron_effllm.eval.report import append_section, write_result

    md = tmp_path / "B.md"
    append_section(str(md), "First", "python tools/x.py --a 1", "| a |\n|---|\n| 1 |", "a note")
    append_section(str(md), "Second", "python tools/y.py", "| b |")
    text = md.read_text()
    assert text.startswith("# Benchmarks\n") and text.count("# Benchmarks") == 1
    assert text.index("### First (") < text.index("### Second (")
    assert "Command: `python tools/x.py --a 1`" in text and "cores" in text and "a note" in text
    path = write_result(str(tmp_path / "out"), "r.json", {"x": 1})
    assert open(path).read().strip().startswith("{") and not os.path.exists(path + ".tmp")


def test_scale_on_paper_counts_the_accumulator_it_reduces(tmp_path, capsys):
    import bench_scale_on_paper as bench

    from megatron_effllm.architecture import Architecture
    from megatron_effllm.pruning.saliency import GradSaliency

    md = tmp_path / "B.md"
    bench.main(["--model", "llama3-8b", "--tp", "8", "--pp", "2", "--dp", "64", "--benchmarks-md", str(md)])
    text = md.read_text()
    arch = Architecture.uniform(**bench.MODELS["llama3-8b"])
    entries = sum(v.numel() for v in GradSaliency(arch, estimators=("taylor",)).state.values())
    # one flat fp64 message over DP: 2 (n-1)/n x 8 bytes x entries
    dp_bytes = bench.ring_bytes(entries * 8, 64)
    assert f"| score all-reduce over DP per prune event | {dp_bytes / 1e6:,.3f} MB |" in text
    grad = bench.ring_bytes(arch.num_params() / 16 * 4, 64)
    assert dp_bytes / grad < 1e-2  # the point of the design: scores are tiny next to gradients
    assert bench.ring_bytes(100.0, 1) == 0.0 and bench.ring_bytes(100.0, 2) == 100.0
    assert "Measured here: rank (TP 0, PP 0) builds its prune-event weight masks" in text
    # With hidden channels masked every weight is touched: one mask entry per weight of the shard.
    small = Architecture.uniform(**bench.MODELS["smollm2-135m"])
    assert bench.measure_mask_build(small, 1, 1)["entries"] == small.num_params()
    norms = (2 * 30 + 1) * 576  # replicated on every TP rank, the rest split in three
    assert bench.measure_mask_build(small, 3, 1)["entries"] == (small.num_params() - norms) // 3 + norms


def test_bench_quality_oneshot_then_train_with_both_recovery_losses(tmp_path, monkeypatch):
    """oneshot_train prunes once (shared by lm and kd), trains T tokens with each loss; the results
    are keyed method+recovery with the full evaluation; a second call trains and evaluates nothing;
    --reeval evaluates the saved models again (identical numbers) without training."""
    import json

    import torch

    import bench_quality as bench
    from megatron_effllm.architecture import Architecture
    from megatron_effllm.assets import smollm2_hf_dir
    from megatron_effllm.convert import hf_io
    from megatron_effllm.model.weights import random_canonical

    arch = Architecture.uniform(num_layers=2, hidden_size=64, num_heads=4, num_kv_groups=2, ffn_hidden_size=128,
                                vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0)
    src = str(tmp_path / "src")
    hf_io.save_hf_model(arch, random_canonical(arch, seed=3), src, tokenizer_dir=smollm2_hf_dir(),
                        dtype=torch.float32)
    out, md = tmp_path / "out", tmp_path / "B.md"
    argv = ["--recipe", os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "--source", src, "--steps", "3",
            "--methods", "source,oneshot_train", "--recovery", "lm,kd", "--limit", "2", "--windows", "1",
            "--calib-tokens", "1024", "--out", str(out), "--benchmarks-md", str(md), "--plot-dir", str(tmp_path)]
    bench.main(argv)
    res = json.load(open(out / "results.json"))
    assert sorted(res) == ["oneshot_train+kd", "oneshot_train+lm", "source"]
    lm, kd = res["oneshot_train+lm"], res["oneshot_train+kd"]
    target = round(0.5 * arch.num_params())
    assert lm["oneshot_params"] == kd["oneshot_params"] == lm["final_params"] == kd["final_params"] <= target
    assert lm["parameters"] == lm["final_params"] and res["source"]["parameters"] == arch.num_params()
    assert (lm["recovery"], kd["recovery"]) == ("lm", "kd")
    assert lm["perplexity"]["domains"] != kd["perplexity"]["domains"]  # the two losses trained differently
    for r in res.values():
        assert set(r["perplexity"]["domains"]) == {"books", "techdocs", "man", "code"}
        assert set(r["perplexity_outside"]["domains"]) == {"wiki", "news", "science"}
        assert r["lambada"]["n"] == 2 and all(t["n"] == 2 for t in r["tasks"].values())
        assert len(r["tasks"]) == 7 and r["paper7_stderr"] is not None
    assert list(bench.teacher_cost(res)) == ["oneshot_train"]
    text = md.read_text()
    assert "| oneshot_train | kd | " in text and "| oneshot_train | lm | " in text and "| source | - | " in text
    assert "Teacher cost (kd s/step / lm s/step, same method): {'oneshot_train': " in text

    def refuse(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(bench, "run", refuse)
    monkeypatch.setattr(bench, "_evaluate", refuse)
    bench.main(argv)  # every entry finished: nothing runs
    monkeypatch.undo()
    monkeypatch.setattr(bench, "run", refuse)
    bench.main(argv[:-6] + ["--reeval", "--out", str(out), "--benchmarks-md", str(md), "--plot-dir", str(tmp_path)])
    again = json.load(open(out / "results.json"))
    for key in res:
        assert again[key]["perplexity"] == res[key]["perplexity"] and again[key]["tasks"] == res[key]["tasks"]
