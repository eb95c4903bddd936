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
