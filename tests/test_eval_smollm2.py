"""Real model (slow, ~1-3 min on 2 CPU cores): SmolLM2-135M-Instruct, read from its GGUF through
effllm-evaluate, is above chance on the first 50 PIQA and ARC-Easy validation examples."""
import torch

from megatron_effllm.cli import evaluate as evaluate_cli


def test_smollm2_gguf_is_above_chance_on_piqa_and_arc_easy(capsys):
    from megatron_effllm.assets import smollm2_gguf

    threads = torch.get_num_threads()
    try:
        report = evaluate_cli.main(["--model", smollm2_gguf(), "--tasks", "piqa,arc_easy", "--limit", "50",
                                    "--batch-size", "16", "--threads", "2", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print("\n" + evaluate_cli.format_report(report))
    piqa, arc = report["tasks"]["piqa"], report["tasks"]["arc_easy"]
    assert piqa["n"] == arc["n"] == 50
    # measured 0.70 (PIQA) and 0.40 (ARC-Easy) acc_norm; chance is 0.50 and 0.25
    assert piqa["acc_norm"] >= 0.60 and piqa["acc"] >= 0.58
    assert arc["acc_norm"] >= 0.32 and arc["acc"] >= 0.36
