"""The training pipeline end to end on 2 real gloo ranks (ZeRO-2): pruning while training,
compaction with carried Adam state, checkpoints, exact resume, HF export."""
import json
import math
import os
import shutil

import pytest
import torch

from dist_utils import run_ranks
from hf_heldout import hf_heldout_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
SHORT = ["train.steps=24", "train.checkpoint_interval=12", "train.log_interval=4",
         "prune.start_step=2", "prune.end_step=16", "prune.compact_every=4",
         "data.dynamic_interval=6", "export.hf_dtype=fp32"]


def _train(rank, world_size, run_dir, extra):
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    cfg = load_config(TINY, SHORT + [f"run_dir={run_dir}"] + list(extra))
    summary = run(cfg)
    from megatron_effllm.model.weights import local_state_dict  # noqa: F401

    return summary


def _final_weights(run_dir):
    from megatron_effllm.convert.hf_io import load_hf_model

    return load_hf_model(os.path.join(run_dir, "final", "hf"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("train") / "full")
    summaries = run_ranks(_train, world_size=2, args=(run_dir, []))
    return run_dir, summaries


def _hf_heldout_losses(run_dir) -> dict:
    from megatron_effllm.training.config import load_config

    cfg = load_config(TINY, SHORT + [f"run_dir={run_dir}"])
    return hf_heldout_losses(cfg, run_dir, os.path.join(run_dir, "final", "hf"))


def test_prunes_to_target_and_exports(full_run):
    run_dir, summaries = full_run
    s = summaries[0]
    assert summaries[0]["final_params"] == summaries[1]["final_params"]
    assert s["final_params"] < 0.62 * s["source_params"]
    src = _final_weights(run_dir)
    assert src.arch.num_params() == s["final_params"]
    records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    kinds = {r["kind"] for r in records}
    assert {"train", "architecture", "compaction", "domains", "summary"} <= kinds
    assert os.path.isfile(os.path.join(run_dir, "plots", "architecture.png"))
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "latest"))
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(train_losses)))


def test_exported_model_reproduces_the_trainers_heldout_loss(full_run):
    """The exported HF model's held-out loss equals the one the trainer measured on its own
    (megatron) model at the end, domain by domain. Same fp32 weights, same batches; only the
    kernels differ (HF eager attention and RMSNorm vs megatron-core's). Tolerance: 2 float32 eps
    (2.4e-7) relative. Each side sums a batch's token losses in float32, so each may round the
    last bit of that sum differently (one eps each); measured: 1.0e-7 on one domain (one
    float32 step at 9.53), the other three equal to the bit."""
    run_dir, summaries = full_run
    trainer = {d: math.log(ppl) for d, ppl in summaries[0]["heldout_ppl_final"].items()}
    hf = _hf_heldout_losses(run_dir)
    assert hf.keys() == trainer.keys()
    for d in trainer:
        print(f"{d}: trainer {trainer[d]:.9f} HF {hf[d]:.9f} rel {abs(hf[d] - trainer[d]) / trainer[d]:.2e}")
    worst = max(abs(hf[d] - trainer[d]) / trainer[d] for d in trainer)
    assert worst <= 2 * torch.finfo(torch.float32).eps, worst


def test_resume_from_mid_prune_checkpoint_is_exact(full_run, tmp_path):
    """Kill after the step-12 checkpoint (inside the pruning window), resume: same result."""
    run_dir, _ = full_run
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(run_dir, "checkpoints", "step_000012"),
                    os.path.join(resumed, "checkpoints", "step_000012"))
    shutil.copytree(os.path.join(run_dir, "data"), os.path.join(resumed, "data"))
    run_ranks(_train, world_size=2, args=(resumed, []))
    a, b = _final_weights(run_dir), _final_weights(resumed)
    assert a.arch == b.arch
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    # The cached H^-1 (mid-cycle at step 12), the same on both data-parallel ranks, is written
    # once, by DP rank 0, and both resumed from it; each rank's own file holds its Hessian sums.
    ranks = os.path.join(run_dir, "checkpoints", "step_000012", "ranks")
    assert sorted(os.listdir(ranks)) == ["rank_00000.pt", "rank_00001.pt", "shared_rank_00000.pt"]
    assert torch.load(os.path.join(ranks, "shared_rank_00000.pt"), weights_only=True)["obs_cache"]
    own = [torch.load(os.path.join(ranks, f"rank_{r:05d}.pt"), weights_only=True) for r in (0, 1)]
    assert all("obs_cache" not in s and s["hessians"] for s in own)


def test_zero3_prunes_like_zero2_and_resumes_exactly(full_run, tmp_path):
    """The same run under ZeRO-3 (parameters partitioned over the 2 ranks; masks act on the
    gathered weights and the partitions, OBS and compaction go through the partitions, widths
    the data-parallel size does not divide included): the ZeRO-2 run's Architecture and, to
    float rounding, its weights; resumed from its mid-prune checkpoint, bit-identical."""
    run_dir, (z2, _) = full_run
    z3_dir = str(tmp_path / "zero3")
    (z3, _) = run_ranks(_train, world_size=2, args=(z3_dir, ["parallel.zero_stage=3"]))
    a, b = _final_weights(run_dir), _final_weights(z3_dir)
    assert a.arch == b.arch and z3["final_params"] == z2["final_params"]
    assert any(l.ffn_hidden_size % 2 for l in b.arch.layers) or b.arch.hidden_size % 2
    rel = max(float((a.state_dict[k] - b.state_dict[k]).abs().max() / a.state_dict[k].abs().max())
              for k in a.state_dict)
    print(f"ZeRO-3 vs ZeRO-2: final loss {z3['final_loss']:.7f} vs {z2['final_loss']:.7f}, weights {rel:.1e}")
    assert abs(z3["final_loss"] - z2["final_loss"]) < 1e-5 * abs(z2["final_loss"]) and rel < 1e-3
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(z3_dir, "checkpoints", "step_000012"),
                    os.path.join(resumed, "checkpoints", "step_000012"))
    shutil.copytree(os.path.join(z3_dir, "data"), os.path.join(resumed, "data"))
    run_ranks(_train, world_size=2, args=(resumed, ["parallel.zero_stage=3"]))
    c = _final_weights(resumed)
    assert c.arch == b.arch
    for k in b.state_dict:
        assert torch.equal(b.state_dict[k], c.state_dict[k]), k


def test_launcher_runs_tiny_config_on_two_ranks(tmp_path):
    """The CI end-to-end check: the real launcher, the shipped tiny config, 2 CPU ranks."""
    import subprocess

    run_dir = tmp_path / "tiny"
    env = dict(os.environ, NPROC_PER_NODE="2", MASTER_PORT=str(__import__("dist_utils").free_port()))
    res = subprocess.run(["bash", os.path.join(ROOT, "launchers", "pretrain_prune.sh"), TINY,
                          f"run_dir={run_dir}", "train.progress_bar=false"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.load(open(run_dir / "final" / "summary.json"))
    assert summary["final_params"] <= 0.6 * summary["source_params"] * 1.02
    assert "held-out perplexity" in res.stdout
    assert os.path.isfile(run_dir / "final" / "hf" / "config.json")
    assert os.path.isfile(run_dir / "plots" / "architecture.png")


@pytest.mark.parametrize("strategy", ["adapt", "uniform", "sheared"])
def test_other_strategies_reach_their_target(tmp_path, strategy):
    """Adapt-Pruner (layer-wise sparsity from block cosine importance), uniform widths and
    Sheared-LLaMA's learned L0 gates, in the same training loop; one process."""
    run_dir = str(tmp_path / strategy)
    extra = [f"prune.strategy={strategy}", "prune.count_embeddings=false", "prune.obs=false",
             "data.dynamic=false", "parallel.zero_stage=1"]
    (summary,) = run_ranks(_train, world_size=1, args=(run_dir, extra))
    from megatron_effllm.architecture import Architecture

    arch = Architecture.load(os.path.join(run_dir, "final", "architecture.json"))
    src = summary["source_params"]
    emb = arch.embedding_params()
    target = round(0.6 * (src - emb)) + emb
    assert arch.num_params() <= target
    widths = {l.ffn_hidden_size for l in arch.layers}
    if strategy == "uniform":  # Minitron-style: one width everywhere, the stem too
        assert len(widths) == 1
    elif strategy == "sheared":  # a fixed target shape: the same widths in every layer
        assert len({(l.num_heads, l.num_kv_groups, l.ffn_hidden_size) for l in arch.layers}) == 1
        assert arch.num_params() < src
        records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
        soft = [r for r in records if r["kind"] == "train" and "lambda1" in r]
        assert soft and all(r["params"] == round(r["expected_params"]) for r in soft[:-1])
    else:  # Adapt-Pruner: heads and FFN per layer, never the stem
        assert arch.hidden_size == 64


def _train_sheared(rank, world_size, run_dir, extra):
    """_train, also returning what this rank's L0 gates were after each of their updates and at
    the end of the soft phase."""
    from megatron_effllm.training.runtime import l0_runtime

    seen = {"after": {}}
    event, finalize = l0_runtime.L0Runtime.prune_event, l0_runtime.L0Runtime._finalize

    def spy_event(self, engine, step):
        if step < self.p.end_step:
            out = event(self, engine, step)
            seen["after"][step] = self.log_alpha.detach().tolist()  # lists: exact, and they pickle
            return out
        return event(self, engine, step)

    def spy_finalize(self, step):
        seen["log_alpha"] = self.log_alpha.detach().tolist()
        seen["lambdas"] = self.lambdas.detach().tolist()
        record = finalize(self, step)
        seen["architecture"] = record["architecture"]
        return record

    l0_runtime.L0Runtime.prune_event, l0_runtime.L0Runtime._finalize = spy_event, spy_finalize
    # A NaN loss on rank 1 at step 5 (inside the soft phase): every rank skips that update.
    os.environ["EFFLLM_INJECT_NONFINITE"] = "loss@5:1"
    try:
        return _train(rank, world_size, run_dir, extra), seen
    finally:
        del os.environ["EFFLLM_INJECT_NONFINITE"]


def test_sheared_gates_agree_across_ranks_and_resume_exactly(tmp_path):
    """Sheared-LLaMA on 2 ranks (ZeRO-2): identical gates and shape on both ranks, a skipped step
    leaves the gates alone, and a run resumed from the step-12 checkpoint (inside the soft phase,
    steps 2-16) ends bit-identical."""
    extra = ["prune.strategy=sheared", "prune.obs=false"]
    full = str(tmp_path / "full")
    (s0, g0), (s1, g1) = run_ranks(_train_sheared, world_size=2, args=(full, extra))
    assert g0["log_alpha"] == g1["log_alpha"] and g0["lambdas"] == g1["lambdas"]
    assert g0["architecture"] == g1["architecture"] and s0["final_params"] == s1["final_params"]
    assert sorted(g0["after"]) == list(range(3, 16))
    assert all(g0["after"][step] == g1["after"][step] for step in range(3, 16))
    assert g0["after"][5] == g0["after"][4]  # the skipped step
    assert g0["after"][6] != g0["after"][5] and len(set(g0["log_alpha"])) > 1  # they learn
    from megatron_effllm.architecture import Architecture

    arch = Architecture.from_dict(g0["architecture"])
    assert arch.num_params() <= round(0.6 * s0["source_params"])
    assert len({(l.num_heads, l.ffn_hidden_size) for l in arch.layers}) == 1
    state = torch.load(os.path.join(full, "checkpoints", "step_000012", "trainer_state.pt"), weights_only=False)
    assert state["pruning"]["phase"] == "soft" and state["pruning"]["log_alpha"] is not None

    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(full, "checkpoints", "step_000012"),
                    os.path.join(resumed, "checkpoints", "step_000012"))
    shutil.copytree(os.path.join(full, "data"), os.path.join(resumed, "data"))
    (_, r0), _ = run_ranks(_train_sheared, world_size=2, args=(resumed, extra))
    assert sorted(r0["after"]) == [13, 14, 15]  # it did resume at step 12
    assert r0["log_alpha"] == g0["log_alpha"] and r0["lambdas"] == g0["lambdas"]
    a, b = _final_weights(full), _final_weights(resumed)
    assert a.arch == b.arch == arch
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k


def test_sheared_config_errors_are_one_line():
    """What the L0 runtime refuses, before any work: layer gates, targets below its floors."""
    from megatron_effllm.architecture import Architecture
    from megatron_effllm.errors import UserError
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.runtime.factory import make_runtime
    from megatron_effllm.training.runtime.l0_runtime import L0Runtime
    from megatron_effllm.training.runtime.saliency_runtime import SaliencyRuntime

    base = SHORT + ["prune.strategy=sheared", "run_dir=unused"]
    arch = Architecture.uniform(**load_config(TINY, base).model.init)
    assert isinstance(make_runtime(load_config(TINY, base), arch, arch.num_params()), L0Runtime)
    for extra, match in ((["prune.allow_depth=true"], "no layer gates; set prune.allow_depth=false"),
                         (["prune.prune_hidden=false", "prune.target_params=0.9"],
                          "out of reach for prune.strategy=sheared")):
        with pytest.raises(UserError, match=match) as err:
            make_runtime(load_config(TINY, base + extra), arch, arch.num_params())
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="make_runtime"):
        SaliencyRuntime(load_config(TINY, base), arch, arch.num_params())


def test_random_init_from_a_pruned_architecture(full_run, tmp_path):
    """model.init={architecture: FILE}: a non-uniform shape trained from scratch (the benchmarks'
    from-scratch baseline); a missing file is one clear line."""
    from megatron_effllm.architecture import Architecture

    pruned = os.path.join(full_run[0], "final", "architecture.json")
    want = Architecture.load(pruned)
    run_dir = str(tmp_path / "scratch")
    extra = [f"model.init={{architecture: {pruned}}}", "prune.strategy=none", "train.steps=2",
             "train.checkpoint_interval=2", "train.eval_interval=2", "data.dynamic=false", "parallel.zero_stage=1"]
    (summary,) = run_ranks(_train, world_size=1, args=(run_dir, extra))
    got = Architecture.load(os.path.join(run_dir, "final", "architecture.json"))
    assert got.to_dict() == want.to_dict() and summary["final_params"] == want.num_params()
    assert len({l.ffn_hidden_size for l in got.layers}) > 1  # really non-uniform
    # The tokenizer was named (smollm2-135m, a GGUF), not a folder: the export writes its HF files.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(run_dir, "final", "hf"))
    assert tok("Hello world")["input_ids"] and tok.model_max_length == got.max_position_embeddings
    (message,) = run_ranks(_error_of, world_size=1, args=(str(tmp_path / "bad"), [
        "model.init={architecture: /nowhere.json}", "prune.strategy=none"]))
    assert "model.init.architecture /nowhere.json not found" in message and "\n" not in message


def _error_of(rank, world_size, run_dir, extra):
    from megatron_effllm.errors import UserError

    try:
        _train(rank, world_size, run_dir, extra)
    except UserError as err:
        return str(err)
    return "no error"
