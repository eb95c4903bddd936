"""Pruning-aware training under pipeline parallelism PP=2 (2 real gloo ranks, ZeRO-2 unless
said otherwise), against the same run in one process at PP=1.

- the default strategy (diagonal Fisher, global ranking, OBS, hidden channels) with the tiny
  config's tied embeddings reaches exactly the PP=1 Architecture and, up to float rounding,
  its weights and loss: each stage's saliency is its own layers', and the tied embedding's
  scores see both uses' gradient as at PP=1 (the first stage's rows join the last stage's
  after the schedule);
- every compaction carries the fp32 masters and Adam moments exactly, each stage its own
  layers; the exported HF model gives the pipeline's logits;
- a run resumed from its mid-prune checkpoint (OBS Hessians per stage) ends bit-identical;
- Sheared-LLaMA's L0 gates (gradients summed over the stages) under ZeRO-1 end like PP=1.
"""
import json
import os

import pytest
import torch

from dist_utils import run_ranks
from test_training_tp import _final_weights, _hf_logits, _resume_copy, _spied_run

PP2 = ["parallel.pp=2"]
FISHER = ["prune.estimator=fisher"]


@pytest.fixture(scope="module")
def pp_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pp")
    pp2_dir, pp1_dir = str(base / "pp2"), str(base / "pp1")
    pp2 = run_ranks(_spied_run, world_size=2, args=(pp2_dir, PP2 + FISHER))
    ((pp1,),) = [run_ranks(_spied_run, world_size=1, args=(pp1_dir, FISHER))]
    return pp2_dir, pp2, pp1_dir, pp1


def test_pp2_run_matches_pp1(pp_runs):
    from megatron_effllm.architecture import Architecture

    pp2_dir, ((s0, seen0), (s1, seen1)), pp1_dir, (r, ref) = pp_runs
    assert seen0["arch"] == seen1["arch"] == ref["arch"]
    a = Architecture.load(os.path.join(pp2_dir, "final", "architecture.json"))
    print(f"PP=2: {a.widths_summary()} hidden {a.hidden_size}")
    assert a.hidden_size < 64 and len({l.ffn_hidden_size for l in a.layers}) > 1
    assert s0["final_params"] == r["final_params"] < 0.62 * r["source_params"]
    assert s0["final_loss"] == s1["final_loss"]  # one loss for the whole pipeline
    assert abs(s0["final_loss"] - r["final_loss"]) < 1e-5 * abs(r["final_loss"])
    w2, w1 = _final_weights(pp2_dir).state_dict, _final_weights(pp1_dir).state_dict
    rel = max(float((w2[k] - w1[k]).abs().max() / w1[k].abs().max()) for k in w1)
    print(f"PP=2 vs PP=1: final loss {s0['final_loss']:.7f} vs {r['final_loss']:.7f}, "
          f"weights max relative difference {rel:.1e}")
    assert rel < 1e-3  # Adam on 24 steps amplifies the rounding of another summation order


def test_pp2_compactions_exact_and_export_gives_pipeline_logits(pp_runs):
    pp2_dir, results, _, _ = pp_runs
    for _, seen in results:
        assert len(seen["compactions"]) >= 3
        for c in seen["compactions"]:
            assert c["keys"] == ["exp_avg", "exp_avg_sq", "param"], c
            assert c["exact"] and c["removed"] > 0, c
    (_, seen0), (_, seen1) = results
    assert (seen0["logits"] == seen1["logits"]).all()
    hf = _hf_logits(pp2_dir)
    diff = float((hf - torch.from_numpy(seen0["logits"])).abs().max())
    print(f"HF export vs megatron PP=2 logits: {diff:.1e}")
    assert diff < 1e-4


def test_pp2_resume_mid_prune_is_exact(pp_runs, tmp_path):
    pp2_dir = pp_runs[0]
    step = os.path.join(pp2_dir, "checkpoints", "step_000012")
    with open(os.path.join(step, "layout.json")) as f:
        assert {k: v for k, v in json.load(f).items() if k != "ranks"} == {"world_size": 2, "zero_stage": 2, "tp": 1, "pp": 2}
    # Each stage saved the Hessians of its own layers.
    states = [torch.load(os.path.join(step, "ranks", f"rank_{r:05d}.pt"), weights_only=False) for r in range(2)]
    layers = [{k.split(".")[3] for k in s["hessians"] if k.startswith("xtx.")} for s in states]
    assert layers == [{"0", "1"}, {"2", "3"}]
    # ... and the saliency sums of its own layers only: another stage's vectors are saved empty.
    for r, s in enumerate(states):
        for key, v in s["saliency"].items():
            if key.split(".")[1:2] in (["head"], ["kv"], ["ffn"]):
                assert (v["values"].numel() > 0) == (key.rsplit(".", 1)[1] in layers[r]), (r, key)
    resumed = str(tmp_path / "resumed")
    _resume_copy(pp2_dir, resumed, 12)
    run_ranks(_spied_run, world_size=2, args=(resumed, PP2 + FISHER))
    a, b = _final_weights(pp2_dir), _final_weights(resumed)
    assert a.arch == b.arch
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k


def test_pp2_sheared_under_zero1_matches_pp1(tmp_path):
    extra = ["prune.strategy=sheared", "parallel.zero_stage=1"]
    (s0, seen0), (s1, _) = run_ranks(_spied_run, world_size=2, args=(str(tmp_path / "pp2"), PP2 + extra))
    ((r, ref),) = run_ranks(_spied_run, world_size=1, args=(str(tmp_path / "pp1"), extra))
    assert seen0["arch"] == ref["arch"]
    assert len({l["ffn_hidden_size"] for l in ref["arch"]["layers"]}) == 1  # Sheared's uniform target
    assert s0["final_loss"] == s1["final_loss"]
    assert abs(s0["final_loss"] - r["final_loss"]) < 1e-5 * abs(r["final_loss"])
