"""Pruning-aware training at tensor parallelism TP=2 (2 real gloo ranks, DP=1, ZeRO-2).

- the same run at TP=1 (one process, the selector held to the TP=2 divisibility so that both
  choose from the same shapes) reaches the same final Architecture;
- the exported HF model reproduces the sharded megatron model's logits;
- every compaction carries the fp32 masters and Adam moments exactly: gathered over TP, they
  equal the pre-compaction ones sliced by the plan;
- with OBS (block-diagonal over TP) the run completes, and a run resumed from the mid-prune
  checkpoint ends bit-identical;
- DeepSpeed's gradient clipping sees the global norm (TP-split parameters summed over the
  ranks, replicated ones once), the block-diagonal Hessians re-shard along the new shards, and
  Sheared-LLaMA's L0 gates train identically on both ranks and like TP=1;
- at TP=2 x DP=2 (4 ranks) under ZeRO-3 (each TP shard partitioned over its DP pair) the run
  ends with the ZeRO-2 run's Architecture and, to float rounding, its weights; compactions carry
  the masters and moments exactly; a resumed run is bit-identical;
- layouts that cannot work (PP with ZeRO-0/3 or depth pruning) are refused in one line.
"""
import dataclasses
import json
import os
import shutil

import pytest
import torch

from dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
SHORT = ["train.steps=24", "train.checkpoint_interval=12", "train.log_interval=4",
         "prune.start_step=2", "prune.end_step=16", "prune.compact_every=4",
         "data.dynamic_interval=6", "export.hf_dtype=fp32", "train.progress_bar=false"]
TP2 = ["parallel.tp=2"]
# with OBS: also a checkpoint at step 4, after three prune events and before the first compaction
TP2_OBS = TP2 + ["train.checkpoint_interval=4", "train.keep_checkpoints=10"]
PROBE = torch.arange(2 * 24).reshape(2, 24) * 997 % 49152  # token ids for logits checks


def _spied_run(rank, world_size, run_dir, extra, tp2_constraints=False):
    """Train; also return the megatron model's logits on PROBE at the end and, for every
    compaction, whether the carried state equals the old state sliced (gathered over TP)."""
    from megatron_effllm import layout
    from megatron_effllm.model.forward import forward_logits
    from megatron_effllm.parallel import comm
    from megatron_effllm.pruning.surgery import slice_state_dict
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.runtime.schedule import Schedule
    from megatron_effllm.training.trainer import Trainer, run

    if tp2_constraints:  # one process choosing from the shapes TP=2 allows
        constraints = Schedule.constraints
        Schedule.constraints = lambda self: dataclasses.replace(constraints(self), tensor_parallel=2)
    seen = {"compactions": []}

    def canonical_state(engine, arch):
        from megatron_effllm.model.weights import _gather_over_model_parallel

        full = engine.gather_full_state()
        keys = sorted(next(iter(full.values())))
        tp, pp = comm.dims().tp, comm.dims().pp
        out = {}
        for key in keys:
            shards = _gather_over_model_parallel({n: e[key] for n, e in full.items()})
            out[key] = layout.from_megatron(arch, shards, tp, pp)
        return out

    compact, finish = Trainer._compact, Trainer._finish

    def spy_compact(self, engine, pruning, step=None):
        plan = pruning.compaction_plan()
        before = canonical_state(engine, pruning.arch)
        engine = compact(self, engine, pruning, step)
        after = canonical_state(engine, plan.after)
        want = {k: slice_state_dict(v, plan) for k, v in before.items()}
        seen["compactions"].append({
            "keys": sorted(after),
            "exact": sorted(after) == sorted(want) and all(
                after[k].keys() == want[k].keys() and all(torch.equal(after[k][n], want[k][n]) for n in want[k])
                for k in want),
            "removed": sum(v.numel() for v in before["param"].values()) - sum(v.numel() for v in after["param"].values()),
        })
        return engine

    def spy_finish(self, engine, pruning, *args):
        seen["logits"] = forward_logits(engine.module, PROBE).numpy()  # numpy: tensors do not outlive a rank
        seen["arch"] = pruning.arch.to_dict()
        return finish(self, engine, pruning, *args)

    Trainer._compact, Trainer._finish = spy_compact, spy_finish
    cfg = load_config(TINY, SHORT + [f"run_dir={run_dir}"] + list(extra))
    summary = run(cfg)
    return summary, seen


def _hf_logits(run_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final", "hf"),
                                                 trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        return model(PROBE).logits.float()


def _final_weights(run_dir):
    from megatron_effllm.convert.hf_io import load_hf_model

    return load_hf_model(os.path.join(run_dir, "final", "hf"))


def _resume_copy(src, dst, step):
    os.makedirs(os.path.join(dst, "checkpoints"))
    name = f"step_{step:06d}"
    shutil.copytree(os.path.join(src, "checkpoints", name), os.path.join(dst, "checkpoints", name))
    shutil.copytree(os.path.join(src, "data"), os.path.join(dst, "data"))


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("tp2") / "noobs")
    results = run_ranks(_spied_run, world_size=2, args=(run_dir, TP2 + ["prune.obs=false"]))
    return run_dir, results


def test_tp2_run_matches_tp1_architecture_and_exports_its_logits(tp2_run, tmp_path):
    run_dir, ((s0, seen0), (s1, seen1)) = tp2_run
    assert s0["final_params"] == s1["final_params"] < 0.62 * s0["source_params"]
    assert seen0["arch"] == seen1["arch"]
    # The same run in one process at TP=1 (same seed, data; the selector held to TP=2's
    # divisibility): the same decisions, so the same final shape.
    ref_dir = str(tmp_path / "tp1")
    ((r, ref),) = run_ranks(_spied_run, world_size=1, args=(ref_dir, ["prune.obs=false"], True))
    from megatron_effllm.architecture import Architecture

    a_tp2 = Architecture.load(os.path.join(run_dir, "final", "architecture.json"))
    a_tp1 = Architecture.load(os.path.join(ref_dir, "final", "architecture.json"))
    print(f"TP=2: {a_tp2.widths_summary()} hidden {a_tp2.hidden_size}; TP=1: {a_tp1.widths_summary()}")
    assert a_tp2 == a_tp1 and a_tp2.hidden_size < 64
    assert len({l.ffn_hidden_size for l in a_tp2.layers}) > 1  # non-uniform: the ranking shaped it
    # The same channels were kept: the weights differ by float rounding only (another split
    # of the same matmuls), not by a different selection.
    w2, w1 = _final_weights(run_dir).state_dict, _final_weights(ref_dir).state_dict
    rel = max(float((w2[k] - w1[k]).abs().max() / w1[k].abs().max()) for k in w1)
    print(f"TP=2 vs TP=1 final weights: max relative difference {rel:.1e}")
    assert rel < 1e-2
    # The exported HF model gives the logits of the sharded megatron model it was gathered from.
    hf = _hf_logits(run_dir)
    diff = float((hf - torch.from_numpy(seen0["logits"])).abs().max())
    print(f"HF export vs megatron TP=2 logits: {diff:.1e} (scale {float(hf.abs().max()):.1f})")
    assert (seen0["logits"] == seen1["logits"]).all()
    assert diff < 1e-4


def test_tp2_compaction_carries_masters_and_adam_moments_exactly(tp2_run):
    _, results = tp2_run
    for _, seen in results:
        assert len(seen["compactions"]) >= 3
        for c in seen["compactions"]:
            assert c["keys"] == ["exp_avg", "exp_avg_sq", "param"], c
            assert c["exact"] and c["removed"] > 0, c


@pytest.fixture(scope="module")
def tp2_obs_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("tp2obs") / "obs")
    results = run_ranks(_spied_run, world_size=2, args=(run_dir, TP2_OBS))
    return run_dir, results


def test_tp2_with_obs_completes_exports_and_resumes_exactly(tp2_obs_run, tmp_path):
    run_dir, ((s0, seen0), _) = tp2_obs_run
    assert s0["final_params"] < 0.62 * s0["source_params"]
    assert all(c["exact"] for c in seen0["compactions"])
    # Each rank saved the Hessians of its own o_proj / down_proj columns.
    ranks = os.path.join(run_dir, "checkpoints", "step_000012", "ranks")
    states = [torch.load(os.path.join(ranks, f"rank_{r:05d}.pt"), weights_only=False) for r in range(2)]
    assert states[0]["hessians"] and states[0]["hessians"].keys() == states[1]["hessians"].keys()
    key = next(k for k in states[0]["hessians"] if k.startswith("xtx."))
    assert not torch.equal(states[0]["hessians"][key], states[1]["hessians"][key])
    with open(os.path.join(run_dir, "checkpoints", "step_000012", "layout.json")) as f:
        assert {k: v for k, v in json.load(f).items() if k != "ranks"} == {"world_size": 2, "zero_stage": 2, "tp": 2, "pp": 1}
    _assert_each_rank_saved_its_own_slice(run_dir)
    hf = _hf_logits(run_dir)
    assert float((hf - torch.from_numpy(seen0["logits"])).abs().max()) < 1e-4
    # Resumed from the step-12 checkpoint (inside the pruning window, OBS cache and Hessians
    # mid-cycle): bit-identical to the uninterrupted run.
    resumed = str(tmp_path / "resumed")
    _resume_copy(run_dir, resumed, 12)
    run_ranks(_spied_run, world_size=2, args=(resumed, TP2_OBS))
    a, b = _final_weights(run_dir), _final_weights(resumed)
    assert a.arch == b.arch
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k


def _assert_each_rank_saved_its_own_slice(run_dir):
    """The saliency vectors of a rank's file hold no zero padding: before the first compaction,
    each head, kv-group and channel vector is exactly the rank's TP shard (its half, at its
    offset), as the plan's checkpoint model counts it; later (the shards re-cut by compactions)
    every vector still starts and ends with a value that is not zero. The cached H^-1 is in the
    per-shard file, not in the rank's own."""
    from megatron_effllm.architecture import Architecture
    from megatron_effllm.layout.dims import ParallelDims
    from megatron_effllm.planning.checkpoint_bytes import saliency_file_bytes
    from megatron_effllm.planning.ranks import shard
    from megatron_effllm.training.config import load_config

    def load(step, name):
        return torch.load(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "ranks", name), weights_only=True)

    cfg = load_config(TINY, SHORT + TP2_OBS)
    with open(os.path.join(run_dir, "checkpoints", "step_000004", "architecture.json")) as f:
        arch = Architecture.from_json(f.read())
    for rank in range(2):
        early, late = load(4, f"rank_{rank:05d}.pt"), load(12, f"rank_{rank:05d}.pt")
        sliced = 0
        for key, v in early["saliency"].items():
            if key.split(".")[1:2] in (["head"], ["kv"], ["ffn"]):
                half = v["size"] // 2
                assert (v["start"], v["values"].numel()) == (rank * half, half), (rank, key)
                sliced += 1
        quantities = sum(key.endswith(".hidden") for key in early["saliency"])
        assert sliced == 3 * arch.num_layers * quantities > 0
        saved = sum(v["values"].numel() * 8 if isinstance(v, dict) else v.numel() * 8
                    for v in early["saliency"].values()) + early["layer_cos"].numel() * 8
        assert saved == saliency_file_bytes(cfg, arch, shard(arch, ParallelDims(rank, 2)), 2)
        for key, v in late["saliency"].items():
            if isinstance(v, dict) and v["values"].numel():
                assert float(v["values"][0]) != 0 and float(v["values"][-1]) != 0, (rank, key)
        assert "obs_cache" not in late
        assert load(12, f"shared_rank_{rank:05d}.pt")["obs_cache"]  # DP=1: each TP shard its own


def test_tp2_dp2_zero3_prunes_like_zero2_exports_and_resumes_exactly(tmp_path):
    """TP=2 x DP=2 under ZeRO-3: every TP shard is partitioned over its data-parallel pair; the
    masks act on the gathered shards and the partitions, OBS and compaction go through them."""
    runs = {}
    for stage in (2, 3):
        run_dir = str(tmp_path / f"zero{stage}")
        runs[stage] = (run_dir, run_ranks(_spied_run, world_size=4,
                                          args=(run_dir, TP2 + [f"parallel.zero_stage={stage}"])))
    (d2, ((z2, _), *_)), (d3, ((z3, seen3), *others3)) = runs[2], runs[3]
    a, b = _final_weights(d2), _final_weights(d3)
    assert a.arch == b.arch and z3["final_params"] == z2["final_params"] < 0.62 * z3["source_params"]
    rel = max(float((a.state_dict[k] - b.state_dict[k]).abs().max() / a.state_dict[k].abs().max())
              for k in a.state_dict)
    print(f"TP=2 x DP=2, ZeRO-3 vs ZeRO-2: loss {z3['final_loss']:.7f} vs {z2['final_loss']:.7f}, "
          f"weights {rel:.1e}; {b.arch.widths_summary()} hidden {b.arch.hidden_size}")
    assert abs(z3["final_loss"] - z2["final_loss"]) < 1e-5 * abs(z2["final_loss"]) and rel < 1e-3
    for seen in [seen3] + [s for _, s in others3]:
        assert len(seen["compactions"]) >= 3 and all(c["exact"] for c in seen["compactions"])
    assert float((_hf_logits(d3) - torch.from_numpy(seen3["logits"])).abs().max()) < 1e-4
    with open(os.path.join(d3, "checkpoints", "step_000012", "layout.json")) as f:
        assert {k: v for k, v in json.load(f).items() if k != "ranks"} == {"world_size": 4, "zero_stage": 3, "tp": 2, "pp": 1}
    resumed = str(tmp_path / "resumed")
    _resume_copy(d3, resumed, 12)
    run_ranks(_spied_run, world_size=4, args=(resumed, TP2 + ["parallel.zero_stage=3"]))
    c = _final_weights(resumed)
    assert c.arch == b.arch
    for k in b.state_dict:
        assert torch.equal(b.state_dict[k], c.state_dict[k]), k


# ---------------------------------------------------------------------- engine-level checks
def _engine_checks_body(rank, world_size, run_dir):
    """Gradient clipping's norm at TP=2, the block-diagonal Hessian re-shard, and a sheared run."""
    from megatron_effllm.architecture import Architecture
    from megatron_effllm.model.builder import build_gpt_model
    from megatron_effllm.engine import build_engine
    from megatron_effllm.engine.base import EngineOptions
    from megatron_effllm.parallel import comm
    from megatron_effllm.parallel.reshard import reshard_block_hessians
    from megatron_effllm.parallel.runtime import init_model_parallel
    from megatron_effllm.pruning.groups import PrunePlan

    out = {}
    init_model_parallel(2, 1, seed=5)
    arch = Architecture.uniform(num_layers=2, hidden_size=32, num_heads=4, num_kv_groups=2,
                                ffn_hidden_size=16, vocab_size=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = build_gpt_model(arch)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)

    def loss_of(m):
        return m(ids, pos, None, labels=ids).float().mean()

    loss_of(model).backward()
    split = sum(float(p.grad.double().square().sum()) for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    repl = sum(float(p.grad.double().square().sum()) for p in model.parameters() if not getattr(p, "tensor_model_parallel", False))
    totals = torch.tensor([split, repl], dtype=torch.float64)
    torch.distributed.all_reduce(totals)  # world = the TP group here
    out["norm_want"] = float((totals[0] + totals[1] / 2) ** 0.5)  # replicated: identical on both ranks
    out["norm_double"] = float((totals[0] + totals[1]) ** 0.5)
    out["repl_equal"] = totals[1].item() / 2
    model.zero_grad(set_to_none=True)
    # megatron's groups are up: the engine partitions over its data-parallel group (the mpu).
    options = EngineOptions(micro_batch=2, grad_accum=1, zero_stage=2, bf16=False, clip_grad=1e-3,
                            lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    engine = build_engine("deepspeed", model, options)
    engine.backward(loss_of(engine), last_micro_batch=True)
    engine.step()
    out["norm_engine"] = engine.grad_norm()
    engine.destroy()

    # Block-diagonal Hessians: rank r holds X^T X of its down_proj columns (FFN channels 8r..8r+7).
    # Rank 0's range loses 7 channels, rank 1's one: the new rank 0 holds channels from both old
    # ranks, whose cross entries the approximation does not have (zero).
    g = torch.Generator().manual_seed(rank + 10)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    name = "model.layers.0.mlp.down_proj.weight"
    state = {f"xtx.{name}": x.T @ x, f"n.{name}": torch.tensor(50.0, dtype=torch.float64)}
    L = range(2)
    kept = [0, 8, 9, 10, 11, 12, 13, 14]
    plan = PrunePlan.build(arch, L, heads={l: range(4) for l in L}, kv={l: range(2) for l in L},
                           ffn={0: kept, 1: range(16)}, hidden=range(32))
    new = reshard_block_hessians(state, plan)
    blocks = comm.all_gather(state[f"xtx.{name}"], "tp")
    full = torch.zeros(16, 16, dtype=torch.float64)
    full[:8, :8], full[8:, 8:] = blocks
    want = full[kept][:, kept][rank * 4:(rank + 1) * 4, rank * 4:(rank + 1) * 4]
    out["hessian_reshard"] = (torch.equal(new[f"xtx.{name}"], want) and float(new[f"n.{name}"]) == 50.0
                              and (rank == 1 or bool((want[0, 1:] == 0).all() and (want[1:, 1:] != 0).all())))

    # Sheared-LLaMA at TP=2: gates after the soft phase, and the final shape.
    out["sheared"] = _sheared(rank, world_size, run_dir)
    return out


def _sheared(rank, world_size, run_dir, extra=TP2):
    from megatron_effllm.training.runtime import l0_runtime
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    seen = {}
    finalize = l0_runtime.L0Runtime._finalize

    def spy_finalize(self, step):
        seen["log_alpha"] = self.log_alpha.detach().numpy().copy()
        record = finalize(self, step)
        seen["architecture"] = record["architecture"]
        return record

    l0_runtime.L0Runtime._finalize = spy_finalize
    cfg = load_config(TINY, SHORT + [f"run_dir={run_dir}", "prune.strategy=sheared", "prune.obs=false",
                                     "data.dynamic=false"] + list(extra))
    seen["summary"] = run(cfg)
    return seen


def _sheared_tp1(rank, world_size, run_dir):
    from megatron_effllm.training.runtime.schedule import Schedule

    constraints = Schedule.constraints
    Schedule.constraints = lambda self: dataclasses.replace(constraints(self), tensor_parallel=2)
    return _sheared(rank, world_size, run_dir, extra=[])


def test_tp2_clipping_norm_hessian_reshard_and_sheared(tmp_path):
    r0, r1 = run_ranks(_engine_checks_body, world_size=2, args=(str(tmp_path / "sheared"),))
    for r in (r0, r1):
        print(f"grad norm: engine {r['norm_engine']:.6e}, global {r['norm_want']:.6e}, "
              f"replicated counted twice {r['norm_double']:.6e}")
        # DeepSpeed sums the squares over the TP group, counting the replicated norms once.
        assert abs(r["norm_engine"] - r["norm_want"]) <= 1e-6 * r["norm_want"]
        assert abs(r["norm_double"] - r["norm_want"]) > 100 * abs(r["norm_engine"] - r["norm_want"])
        assert r["hessian_reshard"]
    s0, s1 = r0["sheared"], r1["sheared"]
    assert (s0["log_alpha"] == s1["log_alpha"]).all() and s0["architecture"] == s1["architecture"]
    from megatron_effllm.architecture import Architecture

    arch = Architecture.from_dict(s0["architecture"])
    assert len({(l.num_heads, l.ffn_hidden_size) for l in arch.layers}) == 1
    assert all(l.num_heads % 2 == 0 and l.ffn_hidden_size % 2 == 0 for l in arch.layers)
    assert s0["summary"]["final_params"] <= round(0.6 * s0["summary"]["source_params"])
    # The same soft phase in one process: the gates follow the same path (float rounding of
    # differently split matmuls aside) and end in the same shape.
    ((ref),) = run_ranks(_sheared_tp1, world_size=1, args=(str(tmp_path / "sheared_tp1"),))
    ref_la, tp2_la = torch.from_numpy(ref["log_alpha"]), torch.from_numpy(s0["log_alpha"])
    gap = float((ref_la - tp2_la).abs().max())
    moved = float((ref_la - ref_la.median()).abs().max())
    print(f"sheared TP=2 vs TP=1 log_alpha: max difference {gap:.1e} (spread {moved:.1e})")
    assert gap < 1e-3 * max(moved, 1.0)
    assert ref["architecture"] == s0["architecture"]


def _strategies_body(rank, world_size, root):
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    out = {}
    for strategy in ("uniform", "adapt"):
        run_dir = os.path.join(root, strategy)
        cfg = load_config(TINY, SHORT + TP2 + [f"run_dir={run_dir}", f"prune.strategy={strategy}",
                                               "prune.count_embeddings=false", "data.dynamic=false"])
        out[strategy] = run(cfg)
    return out


def test_uniform_and_adapt_strategies_at_tp2(tmp_path):
    """The other saliency strategies at TP=2 (uniform with OBS on): both ranks end with the same
    shape, at the target, every split width divisible by 2."""
    from megatron_effllm.architecture import Architecture

    r0, r1 = run_ranks(_strategies_body, world_size=2, args=(str(tmp_path),))
    for strategy in ("uniform", "adapt"):
        assert r0[strategy]["widths"] == r1[strategy]["widths"]
        arch = Architecture.load(os.path.join(tmp_path, strategy, "final", "architecture.json"))
        emb = arch.embedding_params()
        assert arch.num_params() <= round(0.6 * (r0[strategy]["source_params"] - emb)) + emb
        assert all(l.num_heads % 2 == 0 and l.num_kv_groups % 2 == 0 and l.ffn_hidden_size % 2 == 0
                   for l in arch.layers)
        if strategy == "uniform":
            assert len({l.ffn_hidden_size for l in arch.layers}) == 1
        else:
            assert arch.hidden_size == 64


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra, match", [
    (["parallel.pp=2", "parallel.zero_stage=3", "prune.strategy=none"], "parallel.pp=2 needs parallel.zero_stage 1 or 2"),
    (["parallel.pp=2", "parallel.zero_stage=0", "prune.strategy=none"], "parallel.pp=2 needs parallel.zero_stage 1 or 2"),
    (["parallel.pp=2", "prune.allow_depth=true"], "removing layers would move layers between pipeline stages"),
])
def test_unsupported_layouts_are_refused_in_one_line(tmp_path, extra, match):
    from megatron_effllm.errors import UserError
    from megatron_effllm.training.config import load_config
    from megatron_effllm.training.trainer import run

    run_dir = tmp_path / "refused"
    with pytest.raises(UserError, match=match) as err:
        run(load_config(TINY, SHORT + [f"run_dir={run_dir}"] + extra))
    assert "\n" not in str(err.value)
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_reshard_at_tp1_is_the_single_process_slicing():
    """The tensor-by-tensor compaction at TP=1 gives exactly what slicing the whole canonical
    state gives (weights, moments; with and without folded L0 gates)."""
    from megatron_effllm.architecture import Architecture, LayerShape
    from megatron_effllm import layout
    from megatron_effllm.parallel.reshard import reshard_state
    from megatron_effllm.pruning import l0
    from megatron_effllm.pruning.groups import PrunePlan
    from megatron_effllm.pruning.surgery import slice_state_dict
    from megatron_fixtures import random_canonical

    for tied, bias in ((True, False), (False, True)):
        arch = Architecture(family="qwen2" if bias else "llama", hidden_size=16, head_dim=4, vocab_size=32,
                            layers=(LayerShape(4, 2, 8, 0), LayerShape(2, 1, 6, 1), LayerShape(4, 2, 8, 2)),
                            num_source_layers=3, tie_word_embeddings=tied, qkv_bias=bias,
                            rms_norm_eps=1e-6, max_position_embeddings=32)
        keys = ("param", "exp_avg", "exp_avg_sq")
        canon = {k: random_canonical(arch, i) for i, k in enumerate(keys)}
        meg = {k: layout.to_megatron(arch, v) for k, v in canon.items()}
        plan = PrunePlan.build(arch, [0, 2], heads={0: [0, 1], 2: [0, 1]}, kv={0: [0], 2: [0]},
                               ffn={0: [1, 3, 5], 2: range(8)}, hidden=[0, 2, 3, 5, 7, 8, 9, 11, 13, 15])
        g = torch.Generator().manual_seed(3)
        gates = {"hidden": torch.rand(16, generator=g, dtype=torch.float64),
                 "heads": [torch.rand(l.num_heads, generator=g, dtype=torch.float64) for l in arch.layers],
                 "ffn": [torch.rand(l.ffn_hidden_size, generator=g, dtype=torch.float64) for l in arch.layers]}
        for fold in (None, gates):
            full = {n: {k: meg[k][n].clone() for k in keys} for n in meg["param"]}
            got = dict(reshard_state(arch, plan, ((n, full.pop(n)) for n in list(full)),
                                     fold=None if fold is None else (lambda c: l0.fold_gates(c, arch, **fold))))
            assert not full  # consumed tensor by tensor
            for k in keys:
                src = canon[k] if (fold is None or k != "param") else l0.fold_gates(canon[k], arch, **fold)
                want = layout.to_megatron(plan.after, slice_state_dict(src, plan))
                assert got.keys() == want.keys()
                for n in want:
                    assert torch.equal(got[n][k], want[n]), (tied, fold is None, k, n)
