"""Sequence parallelism at TP=2 (2 real gloo ranks) is exact: the same losses, gradients, pruning
statistics, prune decisions and OBS updates as TP=2 without it, for the local spec (its own
RMSNorm on sequence slices) and TransformerEngine's module tree (tests/te_stub.py: norms fused
into the linears, hidden-channel masks corrected on the gathered sequence); a short training run
ends with the same Architecture. Without the sum of the norms' gradients over TP the scores differ.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from dist_utils import run_ranks
from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError
from megatron_effllm.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
ARCH = dict(num_layers=4, hidden_size=32, num_heads=4, num_kv_groups=2, ffn_hidden_size=64, vocab_size=96)
SEQ, BATCH, STEPS = 16, 2, 4
TOL = 1e-6  # fp32 rounding (sums over tokens may be taken in another order)
SPEC_TOL = 1e-5  # the two specs apply the kept-channel factor before / after the matmul (1e-4 unsummed)


class _Engine:
    """What the pruning runtime asks of an engine: the module and its fp32 weights (no ZeRO)."""

    def __init__(self, module):
        self.module = module

    def is_partitioned(self, p):
        return False

    def full_fp32_param(self, p):
        return p.detach().float().clone()

    def set_full_param(self, p, full):
        with torch.no_grad():
            p.copy_(full)


def _run_steps(sp: bool, te: bool, strategy: str) -> dict:
    """STEPS steps of a tiny TP=2 model under ``strategy`` (efficientllm: saliency and OBS
    Hessians, hidden channels pruned; adapt: also block cosines): every loss and gradient, and at
    every prune event the reduced score vectors, layer importance, decided Architecture and the
    weights after the OBS update."""
    from megatron_effllm.model import build_gpt_model, load_canonical
    from megatron_effllm.model.weights import random_canonical
    from megatron_effllm.parallel.distributed_pruning import reduce_saliency
    from megatron_effllm.training.runtime.factory import make_runtime

    arch = Architecture.uniform(**ARCH)
    cfg = load_config(TINY, ["parallel.tp=2", f"parallel.sequence_parallel={str(sp).lower()}",
                             f"data.seq_len={SEQ}", f"prune.strategy={strategy}", "prune.start_step=0",
                             f"prune.end_step={STEPS}", "prune.target_params=0.5", "prune.obs_tokens_per_step=1000"])
    model = build_gpt_model(arch, use_te=te, sequence_parallel=sp).train()
    load_canonical(model, arch, random_canonical(arch, seed=3))
    engine = _Engine(model)
    pruning = make_runtime(cfg, arch, arch.num_params())
    pruning.install(engine)
    g = torch.Generator().manual_seed(1)
    out = {"loss": [], "grads": [], "events": []}
    for step in range(STEPS):
        pruning.start_step(True, samples_per_rank=float(BATCH), grad_scale=1.0, step=step)
        tokens = torch.randint(0, ARCH["vocab_size"], (BATCH, SEQ), generator=g)
        positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
        loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).float().mean()
        loss.backward()
        pruning.end_micro_batch(float(BATCH))
        out["loss"].append(loss.detach())
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
                p.grad = None
        if pruning.event_due(step + 1):
            scores = {k: v.cpu() for k, v in reduce_saliency(pruning.stats.saliency).state.items()}
            importance = pruning._layer_importance(pruning.effective_plan())
            record = pruning.prune_event(engine, step + 1)
            out["events"].append({"scores": scores, "importance": importance,
                                  "arch": None if record is None else record["architecture"],
                                  "weights": {n: p.detach().clone() for n, p in model.named_parameters()}})
    pruning.remove_hooks()
    return out


def _compare(rank, world_size, te: bool, strategies: tuple) -> dict:
    """Per strategy, SP vs no SP on this rank (and SP without the norms' gradient sum): the
    largest relative differences, and whether the decisions agree. With TE's tree also its
    gradients (no SP) against the local spec's."""
    from megatron_effllm.model import builder
    from megatron_effllm.parallel.runtime import init_model_parallel
    from te_stub import te_like_spec

    if te:
        builder.te_available = lambda: True
        builder.get_gpt_layer_with_transformer_engine_spec = te_like_spec
    init_model_parallel(2, 1)
    runs = {s: (_run_steps(False, te, s), _run_steps(True, te, s)) for s in strategies}
    local = _run_steps(False, False, strategies[0])["grads"] if te else None
    builder.reduce_sequence_parallel_grads = lambda model: []
    unsummed = _run_steps(True, te, strategies[0])
    out = {s: _differences(base, sp, unsummed if s == strategies[0] else None) for s, (base, sp) in runs.items()}
    if te:
        out["te_vs_local_grads"] = _worst([{_local_name(k): v for k, v in g.items()}
                                          for g in runs[strategies[0]][0]["grads"]], local)
    return out


def _local_name(name: str) -> str:
    """The local spec's name of a TE-tree parameter (the fused norms' weights)."""
    return name.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight").replace(
        "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def _worst(a: list, b: list) -> float:
    """The largest relative difference between two lists of {name: tensor} (over ``b``'s keys)."""
    return max(_rel(x[k], y[k]) for x, y in zip(a, b) for k in y)


def _differences(base: dict, sp: dict, unsummed) -> dict:
    """The largest relative differences of ``sp`` (and ``unsummed``) from ``base``."""
    events = list(zip(sp["events"], base["events"]))
    norms = [n for n in base["grads"][0] if "norm" in n]
    out = {
        "events": len(base["events"]),
        "hidden_pruned": [e["arch"]["hidden_size"] for e in base["events"] if e["arch"]],
        "loss": max(_rel(a, b) for a, b in zip(sp["loss"], base["loss"])),
        "grads": _worst(sp["grads"], base["grads"]),
        "scores": _worst([e["scores"] for e, _ in events], [b["scores"] for _, b in events]),
        "importance": max(_rel(e["importance"], b["importance"]) for e, b in events),
        "weights": _worst([e["weights"] for e, _ in events], [b["weights"] for _, b in events]),
        "same_decisions": [e["arch"] for e, _ in events] == [b["arch"] for _, b in events],
        "norm_names": norms,
    }
    if unsummed is not None:
        out["unsummed_norm_grads"] = _worst([{k: g[k] for k in norms} for g in unsummed["grads"]],
                                            [{k: g[k] for k in norms} for g in base["grads"]])
        out["unsummed_scores"] = _worst([e["scores"] for e in unsummed["events"]], [b["scores"] for _, b in events])
    return out


@pytest.mark.parametrize("te", [False, True], ids=["local", "te"])
def test_sequence_parallel_equals_tp2_statistics_decisions_and_obs(te):
    strategies = ("efficientllm",) if te else ("efficientllm", "adapt")
    for rank, per_strategy in enumerate(run_ranks(_compare, world_size=2, args=(te, strategies))):
        if te:  # the fused norms' kept-channel factor: its gradient summed over the TP ranks' columns
            assert per_strategy.pop("te_vs_local_grads") < SPEC_TOL, per_strategy
        for strategy, r in per_strategy.items():
            assert r["norm_names"] and r["events"] == STEPS, (strategy, r)
            for key in ("loss", "grads", "scores", "importance", "weights"):
                assert r[key] < TOL, (rank, strategy, key, r)
            assert r["same_decisions"], (strategy, r)
        # hidden channels are masked, so the norms' kept-channel correction runs on sequence slices
        assert min(per_strategy["efficientllm"]["hidden_pruned"]) < ARCH["hidden_size"], per_strategy
        # Without the sum over TP each rank's norms keep the gradient of its own tokens only.
        r = per_strategy["efficientllm"]
        assert r["unsummed_norm_grads"] > 0.05 and r["unsummed_scores"] > 0.05, r


def _cosines_through_a_checkpoint(rank, world_size) -> tuple:
    """Block-cosine sums of each TP rank's sequence slice (rank + 1 each), saved by each rank as
    its own and loaded back: (this rank's loaded sums, their total over TP)."""
    from megatron_effllm.parallel import comm
    from megatron_effllm.parallel.runtime import init_model_parallel
    from megatron_effllm.pruning.obs import HessianAccumulator
    from megatron_effllm.pruning.saliency import GradSaliency
    from megatron_effllm.training.runtime.state import Statistics

    init_model_parallel(2, 1)
    arch = Architecture.uniform(**ARCH)

    def stats(value: float) -> Statistics:
        return Statistics(GradSaliency(arch), HessianAccumulator(),
                          torch.full((ARCH["num_layers"], 2), value, dtype=torch.float64), cos_split_over_tp=True)

    running = stats(rank + 1.0)
    saved = running.rank_state()
    resumed = stats(0.0)
    resumed.load_rank_state(saved)
    return float(resumed.layer_cos[0, 0]), float(comm.all_reduce_flat([resumed.layer_cos], ["tp"])[0][0, 0])


def test_sequence_parallel_block_cosines_survive_a_checkpoint_once():
    (here0, total0), (here1, total1) = run_ranks(_cosines_through_a_checkpoint, world_size=2)
    assert (here0, here1) == (1.0, 2.0)  # each TP rank keeps its own slice's partial sum
    assert total0 == total1 == 3.0  # summed over TP once, at the prune event, after the resume


SHORT = ["train.steps=20", "train.checkpoint_interval=10", "train.log_interval=1", "train.eval_interval=10",
         "prune.start_step=2", "prune.end_step=14", "prune.compact_every=4", "data.dynamic_interval=5",
         "export.hf=false", "parallel.tp=2"]


def _train(rank, world_size, run_dir, sp):
    from megatron_effllm.training.trainer import run

    run(load_config(TINY, SHORT + [f"run_dir={run_dir}", f"parallel.sequence_parallel={str(sp).lower()}"]))


def _losses(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_sequence_parallel_training_run_ends_with_the_same_architecture(tmp_path):
    """The tiny config at TP=2 (ZeRO-2, OBS, hidden channels pruned, compactions, a checkpoint)
    with and without sequence parallelism: the same losses and final Architecture."""
    dirs = {sp: str(tmp_path / f"sp_{sp}") for sp in (False, True)}
    for sp, run_dir in dirs.items():
        run_ranks(_train, world_size=2, args=(run_dir, sp))
    archs = {sp: Architecture.load(os.path.join(d, "final", "architecture.json")) for sp, d in dirs.items()}
    assert archs[True] == archs[False] and archs[False].hidden_size < 64
    losses = {sp: _losses(d) for sp, d in dirs.items()}
    assert [s for s, _ in losses[True]] == [s for s, _ in losses[False]] and len(losses[False]) >= 20
    for (_, a), (_, b) in zip(losses[True], losses[False]):
        assert abs(a - b) <= TOL * abs(b), (losses[True], losses[False])


def test_sequence_parallel_layouts_refused_in_one_line():
    refused = {
        ("parallel.sequence_parallel=true",): "needs parallel.tp >= 2",
        ("parallel.sequence_parallel=true", "parallel.tp=2", "data.seq_len=63"): "data.seq_len 63 is not divisible",
        ("parallel.sequence_parallel=true", "parallel.tp=2", "parallel.pp=2"): "with parallel.pp=2 is not supported",
        ("parallel.sequence_parallel=true", "parallel.tp=2", "prune.strategy=sheared"): "prune.strategy sheared",
    }
    for overrides, message in refused.items():
        with pytest.raises(UserError, match=message) as err:
            load_config(TINY, list(overrides))
        assert "\n" not in str(err.value)
    assert load_config(TINY, ["parallel.sequence_parallel=true", "parallel.tp=2"]).parallel.sequence_parallel
