"""Model-family snapshots (``export.snapshots``): one tiny pruning run on 2 real gloo ranks
(ZeRO-2) writes an HF folder for each fraction of the source's size it passes, each loads in
transformers and computes what the trainer's model computed at that step; a run resumed between
two snapshots writes only the second, bit-identical to the first run's."""
import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from dist_utils import run_ranks
from hf_heldout import hf_heldout_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
# Pruning every step from step 2 to 14 (0.6 x the source), compacting every 4 events: the 0.9 and
# 0.7 snapshots fall between compactions (sliced from the masked model) several steps apart,
# with a checkpoint every 4 steps between them.
FRACTIONS = (0.9, 0.7)
SNAP = ["train.steps=16", "train.checkpoint_interval=4", "train.keep_checkpoints=8", "train.log_interval=4",
        "train.eval_interval=100", "prune.start_step=2", "prune.end_step=14", "prune.compact_every=4",
        "data.dynamic_interval=6", "export.hf_dtype=fp32", "export.gguf=true",
        "export.snapshots=[0.7,0.9]"]


def _train(rank, world_size, run_dir):
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    return run(load_config(TINY, SNAP + [f"run_dir={run_dir}"]))


def _snapshot_records(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "snapshot"]


@pytest.fixture(scope="module")
def snap_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("snap") / "run")
    summaries = run_ranks(_train, world_size=2, args=(run_dir,))
    return run_dir, summaries


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def test_each_fraction_is_written_once_and_loads_in_transformers(snap_run):
    from megatron_effllm.convert.gguf_export import is_exported_gguf

    run_dir, summaries = snap_run
    s = summaries[0]
    assert summaries[1]["snapshots"] == s["snapshots"]
    snaps = s["snapshots"]
    assert [r["fraction"] for r in snaps] == list(FRACTIONS)  # largest first, each once
    assert snaps[0]["step"] < snaps[1]["step"] <= 14
    assert [{k: r[k] for k in ("fraction", "step", "params", "path")} for r in _snapshot_records(run_dir)] == \
        [{k: r[k] for k in ("fraction", "step", "params", "path")} for r in snaps]
    with open(os.path.join(run_dir, "final", "summary.json")) as f:
        assert json.load(f)["snapshots"] == snaps
    for r in snaps:
        folder = os.path.join(run_dir, "snapshots", f"{r['fraction']:g}")
        assert r["path"] == os.path.join(folder, "hf") and r["gguf"] == os.path.join(folder, "model.gguf")
        assert is_exported_gguf(r["gguf"])
        model = _hf_model(r["path"])
        n = sum(p.numel() for p in model.parameters())
        assert n == r["params"] <= r["fraction"] * s["source_params"]
        assert s["final_params"] < n  # a member of the family, not the end of it
    # the first time the model is that small: at the prune event before, it was larger
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        sizes = {rec["step"]: rec["params"] for rec in map(json.loads, f)
                 if rec["kind"] == "architecture" and "target" in rec}  # the prune events
    for r in snaps:
        assert sizes[r["step"]] == r["params"]
        earlier = [step for step in sizes if step < r["step"]]
        before = sizes[max(earlier)] if earlier else s["source_params"]
        assert before > r["fraction"] * s["source_params"]

def test_snapshot_computes_what_the_trainer_computed_at_its_step(snap_run):
    """The snapshot's held-out loss in transformers equals the one the trainer measured on its
    own (masked, not yet compacted) megatron model at that step, domain by domain: the slice of
    the masked weights is the pruned model. Same fp32 weights and batches; only the kernels and
    the masked model's norm rescaling differ. Tolerance: 2 float32 eps (2.4e-7) relative, as for
    the final export; measured: 9.1e-8 (0.9) and 9.6e-8 (0.7) on the worst domain."""
    from megatron_effllm.training.config import load_config

    run_dir, summaries = snap_run
    cfg = load_config(TINY, SNAP + [f"run_dir={run_dir}"])
    for r in summaries[0]["snapshots"]:
        trainer = {d: math.log(p) for d, p in r["heldout_ppl"].items()}
        hf = hf_heldout_losses(cfg, run_dir, r["path"])
        assert hf.keys() == trainer.keys()
        worst = max(abs(hf[d] - trainer[d]) / trainer[d] for d in trainer)
        print(f"snapshot {r['fraction']}: worst relative difference {worst:.2e}")
        assert worst <= 2 * torch.finfo(torch.float32).eps, (r["fraction"], worst)


def test_resume_between_two_snapshots_writes_only_the_second(snap_run, tmp_path):
    """Resumed from a checkpoint after the 0.9 snapshot and before the 0.7 one: only 0.7 is
    written, bit-identical to the first run's, and the summary lists both."""
    run_dir, summaries = snap_run
    first, second = summaries[0]["snapshots"]
    step = max(k for k in range(4, 17, 4) if first["step"] <= k < second["step"])
    resumed = str(tmp_path / "resumed")
    name = f"step_{step:06d}"
    shutil.copytree(os.path.join(run_dir, "checkpoints", name), os.path.join(resumed, "checkpoints", name))
    shutil.copytree(os.path.join(run_dir, "data"), os.path.join(resumed, "data"))
    again = run_ranks(_train, world_size=2, args=(resumed,))[0]
    assert not os.path.exists(os.path.join(resumed, "snapshots", "0.9"))
    assert [r["fraction"] for r in _snapshot_records(resumed)] == [0.7]
    keys = ("fraction", "step", "params", "heldout_ppl")
    assert [{k: r[k] for k in keys} for r in again["snapshots"]] == [{k: r[k] for k in keys} for r in (first, second)]
    assert again["snapshots"][0]["path"] == first["path"]  # recorded by the first run, not written again
    from megatron_effllm.convert.hf_io import load_hf_model

    a, b = load_hf_model(second["path"]), load_hf_model(os.path.join(resumed, "snapshots", "0.7", "hf"))
    assert a.arch == b.arch
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k


def test_a_fraction_below_an_absolute_target_is_refused_in_one_line():
    """The target as a parameter count (or not counting embeddings) is known only with the
    source: the run refuses a fraction it would never reach before it starts."""
    from megatron_effllm.errors import UserError
    from megatron_effllm.training.export import Snapshots

    cfg = SimpleNamespace(export=SimpleNamespace(snapshots=[0.5, 0.8]),
                          prune=SimpleNamespace(strategy="efficientllm", target_params=600.0))
    with pytest.raises(UserError) as err:
        Snapshots(cfg, source_params=1000, target=600, tokenizer=None, metrics=None, is_main=True)
    assert str(err.value).startswith("export.snapshots: 0.5 x 1,000 source parameters is below the run's "
                                     "target of 600 (prune.target_params 600)")
    snaps = Snapshots(cfg, source_params=1000, target=500, tokenizer=None, metrics=None, is_main=True)
    assert snaps.fractions == [0.8, 0.5] and snaps.due(801) == [] and snaps.due(800) == [0.8]
    assert snaps.due(499) == [0.8, 0.5]
