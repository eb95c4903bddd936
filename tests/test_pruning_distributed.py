"""Pruning statistics and decisions across ranks (parallel/distributed_pruning.py), through the
functions the training runtime runs (its gradient feed and live masks).

In one process: every TP/PP shard of a canonical (weight, gradient) pair, fed through the
layout map, sums to the full-model accumulator. On two real gloo ranks: DP=2 scores equal one
process's over the same micro-batches and the ranks must agree on the plan (a disagreement
raises on both); TP=2 and PP=2 give the TP=1 scores, plan and sliced weights, and a masked
model equals the physically pruned one at TP=1, TP=2 and PP=2.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks
from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm import layout
from megatron_effllm.errors import UserError
from megatron_effllm.layout.dims import ParallelDims
from megatron_effllm.parallel import comm
from megatron_effllm.parallel import distributed_pruning as dp
from megatron_effllm.pruning.groups import PrunePlan
from megatron_effllm.pruning.saliency import GradSaliency, merge_states
from megatron_fixtures import random_canonical

BATCH, SEQ, VOCAB = 4, 12, 128
ESTIMATOR = "fisher"
EXACT = 1e-12  # float64 sums of identical float32 products, in another order


def tiny(family: str) -> Architecture:
    """GQA with 4 KV groups (so TP=2 can still remove a pair), 3 layers (PP=2 splits 2+1);
    qwen2: qkv bias and tied embeddings (megatron keeps a copy on the last stage)."""
    return Architecture(
        family=family, hidden_size=32, head_dim=4, vocab_size=VOCAB,
        layers=tuple(LayerShape(8, 4, 32, i) for i in range(3)), num_source_layers=3,
        tie_word_embeddings=family == "qwen2", qkv_bias=family == "qwen2",
        rms_norm_eps=1e-6, max_position_embeddings=64,
    )


def weights(arch: Architecture, seed: int = 3) -> dict:
    """Random canonical weights with four weak hidden channels (small embedding columns and
    norm entries), so that the global ranking removes hidden channels too, not only heads and FFN."""
    sd = random_canonical(arch, seed)
    weak = [3, 11, 20, 27]
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            t[weak] *= 0.05
    sd["model.embed_tokens.weight"][:, weak] *= 0.05
    return sd


def rel_diff(a: dict, b: dict) -> float:
    """max over keys of max|a - b| / max|b| (per vector, so small vectors are not drowned)."""
    return max(float((a[k] - v).abs().max() / v.abs().max().clamp(min=1e-300)) for k, v in b.items())


def as64(sd: dict) -> dict:
    return {k: v.double() for k, v in sd.items()}


# ---------------------------------------------------------------------- one process
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_layout_of_shards_sums_to_the_full_accumulator(family):
    arch = tiny(family).with_layers(  # non-uniform widths, so a layer mix-up cannot go unnoticed
        (LayerShape(8, 4, 32, 0), LayerShape(4, 2, 12, 1), LayerShape(8, 2, 20, 2)))
    w, g = as64(random_canonical(arch, 0)), as64(random_canonical(arch, 1))
    full = GradSaliency(arch)
    full.update(w, g, count=3)
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3)):
        w_shards, g_shards = layout.all_shards(arch, w, tp, pp), layout.all_shards(arch, g, tp, pp)
        states = []
        for (t, p), local in w_shards.items():
            acc = GradSaliency(arch)
            dp.feed_local_tensors(acc, local, g_shards[(t, p)], 3, ParallelDims(t, tp, p, pp))
            states.append(acc.state_dict())
        merged = merge_states(states)
        assert rel_diff(merged, full.state_dict()) <= EXACT, (tp, pp)
        if tp * pp > 1:  # each shard alone is partial
            assert all(rel_diff(s, full.state_dict()) > 0.1 for s in states), (tp, pp)
    # the same shards fed as if they sat elsewhere no longer sum to the full accumulator
    w_shards, g_shards = layout.all_shards(arch, w, 2, 1), layout.all_shards(arch, g, 2, 1)
    wrong = [GradSaliency(arch) for _ in range(2)]
    for t in range(2):
        dp.feed_local_tensors(wrong[t], w_shards[(1 - t, 0)], g_shards[(1 - t, 0)], 3, ParallelDims(t, 2))
    assert rel_diff(merge_states([a.state_dict() for a in wrong]), full.state_dict()) > 0.1


def test_pieces_refuse_tensors_of_another_layout():
    arch = tiny("llama")
    shard = layout.to_megatron(arch, random_canonical(arch), layout.ParallelDims(0, 2))
    with pytest.raises(UserError, match="another architecture or layout"):
        layout.canonical_pieces(arch, "decoder.layers.0.mlp.linear_fc2.weight",
                                shard["decoder.layers.0.mlp.linear_fc2.weight"], layout.ParallelDims(0, 1))
    with pytest.raises(UserError, match="holds only 1 layers"):
        layout.canonical_pieces(arch, "decoder.layers.1.input_layernorm.weight", torch.ones(32), layout.ParallelDims(pp_rank=1, pp=2))
    with pytest.raises(UserError, match="no canonical tensor"):
        layout.canonical_pieces(arch, "decoder.layers.0.self_attention.q_layernorm.weight", torch.ones(4))


def test_decision_hash_covers_the_architecture_and_every_kept_index():
    arch = tiny("llama")
    L = range(3)
    base = dict(heads={l: range(8) for l in L}, kv={l: range(4) for l in L}, hidden=range(32))
    a = PrunePlan.build(arch, L, ffn={l: range(16) for l in L}, **base)
    same = PrunePlan.build(arch, L, ffn={l: range(16) for l in L}, **base)
    # same new Architecture, one FFN channel of one layer swapped
    other = PrunePlan.build(arch, L, ffn={0: list(range(15)) + [20], 1: range(16), 2: range(16)}, **base)
    assert other.after == a.after
    digest = dp.check_same_decision(a)  # no process group: nothing to compare with
    assert digest == dp.check_same_decision(same) != dp.check_same_decision(other)
    assert dp.check_same_decision(a.after) != dp.check_same_decision(arch)
    assert dp.check_same_decision(b"x") != dp.check_same_decision(b"y")


# ---------------------------------------------------------------------- ranks
def _backward(model, ids, labels):
    """One forward/backward of the mean token loss through megatron's schedule (any TP/PP)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)

    def step(data_iterator, m):
        out = m(ids, position_ids, None, labels=labels)
        return out, lambda per_token: (per_token.float().mean(), {})

    model.zero_grad()
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=False)
    dp.allreduce_tied_embedding_grads_(model)


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _target(arch):
    return int(0.5 * arch.num_params())


def _data_parallel_body(rank, world_size):
    from megatron_effllm.model import build_gpt_model, load_canonical
    from megatron_effllm.parallel.runtime import init_model_parallel
    from megatron_effllm.pruning.selection import Constraints
    from megatron_effllm.pruning.selectors.global_ranking import select_global

    init_model_parallel(1, 1)  # two ranks: DP=2
    arch = tiny("llama")
    sd = weights(arch)
    model = build_gpt_model(arch)
    load_canonical(model, arch, sd)
    ids, labels = _batch()
    half = BATCH // 2
    mine = slice(rank * half, (rank + 1) * half)

    local = GradSaliency(arch)
    _backward(model, ids[mine], labels[mine])
    dp.feed_saliency(local, model, half)
    reduced = dp.reduce_saliency(local)
    out = {"count": float(reduced.state["count"]), "local_vs_reduced": rel_diff(local.state, reduced.state)}

    # one process over the same micro-batches, and (first-order sums are linear) the whole batch at once
    one = GradSaliency(arch)
    for r in range(world_size):
        _backward(model, ids[r * half:(r + 1) * half], labels[r * half:(r + 1) * half])
        dp.feed_saliency(one, model, half)
    out["dp_vs_one_process"] = rel_diff(reduced.state, one.state)
    whole = GradSaliency(arch, ["taylor"])
    _backward(model, ids, labels)
    dp.feed_saliency(whole, model, BATCH)
    out["dp_vs_whole_batch_wg"] = rel_diff({k: reduced.state[k] for k in whole.state}, whole.state)

    c = Constraints(tensor_parallel=1)
    plan = select_global(reduced.scores(ESTIMATOR), _target(arch), c)
    out["plan_as_one_process"] = plan.to_dict() == select_global(one.scores(ESTIMATOR), _target(arch), c).to_dict()
    out["digest"] = dp.check_same_decision(plan)
    out["digest_dp_group"] = dp.check_same_decision(plan, "dp")

    # rank 1 keeps another FFN channel in one layer: same Architecture, different weights kept
    ffn = {l: plan.ffn[l].tolist() for l in plan.kept_layers}
    if rank == 1:
        l = next(l for l in plan.kept_layers if len(ffn[l]) < arch.layers[l].ffn_hidden_size)
        dropped = sorted(set(range(arch.layers[l].ffn_hidden_size)) - set(ffn[l]))
        ffn[l] = sorted(ffn[l][1:] + [dropped[0]])
    skewed = PrunePlan.build(arch, plan.kept_layers, plan.heads, plan.kv, ffn, plan.hidden)
    out["skewed_same_arch"] = skewed.after == plan.after
    errors = []
    for decision in (skewed, skewed.after.to_json() + ("x" if rank == 0 else "")):
        try:
            dp.check_same_decision(decision)
            errors.append(None)
        except comm.AgreementError as err:
            errors.append(str(err))
    out["errors"] = errors
    # the failed checks left no collective pending: the group still works
    probe = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(probe)
    out["probe"] = float(probe)
    return out


def test_data_parallel_scores_equal_one_process_and_ranks_must_agree():
    results = run_ranks(_data_parallel_body, world_size=2)
    for rank, r in enumerate(results):
        print(f"rank {rank}: DP=2 vs one process {r['dp_vs_one_process']:.1e}, "
              f"vs whole batch (w*g) {r['dp_vs_whole_batch_wg']:.1e}")
        assert r["count"] == BATCH
        assert r["local_vs_reduced"] > 0.05  # the reduction did something
        assert r["dp_vs_one_process"] <= EXACT
        assert r["dp_vs_whole_batch_wg"] <= 1e-5  # float32 gradients of another batch split
        assert r["plan_as_one_process"] and r["skewed_same_arch"]
        assert r["probe"] == 3.0
        for err in r["errors"]:
            assert err is not None and "ranks disagree on the pruning decision" in err
            assert "rank 0:" in err and "rank 1:" in err, err
    assert results[0]["digest"] == results[1]["digest"] == results[0]["digest_dp_group"]
    assert results[0]["errors"] == results[1]["errors"]  # both ranks raise the same message


def _layouts_body(rank, world_size):
    from megatron_effllm.model import build_gpt_model, forward_logits, gather_canonical, load_canonical
    from megatron_effllm.model.weights import gather_canonical_grads
    from megatron_effllm.parallel.runtime import init_model_parallel
    from megatron_effllm.pruning.selection import Constraints
    from megatron_effllm.pruning.selectors.global_ranking import select_global
    from megatron_effllm.pruning.surgery import masks_from_plan, slice_state_dict
    from megatron_effllm.training.runtime.live_model import LiveMasks

    ids, labels = _batch()
    c = Constraints(tensor_parallel=2)  # the plan must be valid at TP=2 as well
    out = {}
    for family in ("llama", "qwen2"):
        arch = tiny(family)
        sd = weights(arch)
        ref = None
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            key = f"{family} TP={tp} PP={pp}"
            r = out[key] = {}
            init_model_parallel(tp, pp)
            model = build_gpt_model(arch)
            load_canonical(model, arch, sd)
            _backward(model, ids, labels)
            local = GradSaliency(arch)
            dp.feed_saliency(local, model, BATCH, compute_dtype=torch.float64)
            # at TP=1 the two ranks are DP replicas that saw the same batch: nothing to reduce
            reduced = local if tp * pp == 1 else dp.reduce_saliency(local)
            # the same gradients, gathered into canonical tensors and fed in one piece
            exact = GradSaliency(arch)
            exact.update(as64(gather_canonical(model, arch)), as64(gather_canonical_grads(model, arch)), count=BATCH)
            r["vs_gathered_grads"] = rel_diff(reduced.state, exact.state)
            r["local_is_partial"] = rel_diff(local.state, reduced.state)
            plan = select_global(reduced.scores(ESTIMATOR), _target(arch), c)
            r["digest"] = dp.check_same_decision(plan)
            sliced = slice_state_dict(gather_canonical(model, arch), plan)
            if ref is None:
                ref = {"state": reduced.state, "plan": plan, "sliced": slice_state_dict(sd, plan)}
                after = plan.after
                r["pruned"] = {"heads": [l.num_heads for l in after.layers],
                               "kv": [l.num_kv_groups for l in after.layers],
                               "ffn": [l.ffn_hidden_size for l in after.layers], "hidden": after.hidden_size}
            r["vs_tp1_scores"] = rel_diff(reduced.state, ref["state"])
            r["same_plan"] = plan.to_dict() == ref["plan"].to_dict() and plan.after == ref["plan"].after
            r["same_sliced"] = sliced.keys() == ref["sliced"].keys() and all(
                torch.equal(v, ref["sliced"][k]) for k, v in sliced.items())

            # physically pruned at this layout vs masked at this layout
            pruned = build_gpt_model(plan.after)
            load_canonical(pruned, plan.after, sliced)
            r["pruned_roundtrip"] = all(torch.equal(v, sliced[k]) for k, v in gather_canonical(pruned, plan.after).items())
            want = forward_logits(pruned, ids)
            unpruned = forward_logits(model, ids)
            # the training runtime's masks: weights zeroed before the forward, norms corrected
            masks = LiveMasks(model, comm.dims())
            masks.set(arch, masks_from_plan(plan))
            r["masked_vs_pruned"] = float((forward_logits(model, ids) - want).abs().max())
            r["unpruned_vs_pruned"] = float((unpruned - want).abs().max())
            masks.remove()
            r["masked_without_norm_fix"] = float((forward_logits(model, ids) - want).abs().max())
    return out


def test_tp2_and_pp2_match_tp1_scores_plan_weights_and_masked_equals_pruned():
    results = run_ranks(_layouts_body, world_size=2)
    for rank, res in enumerate(results):
        for key, r in res.items():
            print(f"rank {rank} {key}: scores vs gathered grads {r['vs_gathered_grads']:.1e}, vs TP=1 "
                  f"{r['vs_tp1_scores']:.1e}; masked vs pruned logits {r['masked_vs_pruned']:.1e} "
                  f"(unpruned {r['unpruned_vs_pruned']:.1e}, no norm fix {r['masked_without_norm_fix']:.1e})"
                  + (f"; pruned to {r['pruned']}" if "pruned" in r else ""))
            assert r["vs_gathered_grads"] <= EXACT, key
            # float32 gradients from differently split matmuls (exact at PP=2: same arithmetic)
            assert r["vs_tp1_scores"] <= 2e-5, key
            assert r["same_plan"] and r["same_sliced"] and r["pruned_roundtrip"], key
            assert r["masked_vs_pruned"] <= 1e-5, key
            assert r["unpruned_vs_pruned"] > 1e-2 and r["masked_without_norm_fix"] > 1e-3, key
            if "TP=2" in key or "PP=2" in key:
                assert r["local_is_partial"] > 0.05, key  # one rank alone does not have the scores
        for family in ("llama", "qwen2"):
            shape = res[f"{family} TP=1 PP=1"]["pruned"]
            # the plan exercises every group kind the masks must handle
            assert shape["hidden"] < 32 and min(shape["kv"]) < 4 and min(shape["ffn"]) < 32, (family, shape)
            assert any(h < 2 * k for h, k in zip(shape["heads"], shape["kv"])), (family, shape)
    assert [r["digest"] for r in results[0].values()] == [r["digest"] for r in results[1].values()]
