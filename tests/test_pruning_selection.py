"""Selectors: budgets, GQA, TP divisibility, floors, determinism, non-uniform widths."""
import pytest
import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning import groups as G
from megatron_effllm.pruning.groups import PruningError
from megatron_effllm.pruning.saliency import GroupScores
from megatron_effllm.pruning.selection import Constraints, select_target_shape
from megatron_effllm.pruning.selectors.adaptive import adapt_pruner_update, select_adaptive, select_layerwise
from megatron_effllm.pruning.selectors.global_ranking import select_global
from megatron_effllm.pruning.selectors.uniform import select_uniform


def arch_(layers=4, hidden=64, heads=8, kv=4, ffn=48, vocab=96, tie=True, qkv_bias=False):
    return Architecture.uniform(num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_groups=kv,
                                ffn_hidden_size=ffn, vocab_size=vocab, head_dim=8, tie_word_embeddings=tie,
                                qkv_bias=qkv_bias, family="qwen2" if qkv_bias else "llama")


def random_scores(arch, seed=0, hidden_scale=1.0, layer_scale=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    L = arch.layers
    return GroupScores(arch, heads=[r(s.num_heads) for s in L], kv=[r(s.num_kv_groups) for s in L],
                       ffn=[r(s.ffn_hidden_size) for s in L], hidden=r(arch.hidden_size) * hidden_scale,
                       layers=None if layer_scale is None else r(arch.num_layers) * layer_scale)


def max_unit_cost(arch, c):
    t = c.tensor_parallel
    costs = [G.hidden_cost(arch) * c.hidden_multiple, G.ffn_cost(arch) * c.ffn_step]
    for l, s in enumerate(arch.layers):
        costs += [s.num_kv_groups * G.head_cost(arch), t * G.kv_cost(arch, l), G.layer_cost(arch, l)]
    return max(costs)


def check_plan(plan, c):
    plan.after.validate(tensor_parallel=c.tensor_parallel)
    for l in plan.kept_layers:
        s = plan.before.layers[l]
        groups = plan.heads[l] // s.heads_per_group
        counts = torch.bincount(groups, minlength=s.num_kv_groups)[plan.kv[l]]
        assert bool((counts == counts[0]).all())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("c", [Constraints(), Constraints(tensor_parallel=2), Constraints(allow_depth=True),
                               Constraints(ffn_multiple=8, hidden_multiple=4, min_heads=4, min_ffn=16)])
def test_global_budget_met_within_one_unit(seed, c):
    arch = arch_(tie=bool(seed % 2), qkv_bias=seed >= 2)
    scores = random_scores(arch, seed, layer_scale=5.0 if c.allow_depth else None)
    for frac in (0.9, 0.6, 0.45):
        target = int(arch.num_params() * frac)
        plan = select_global(scores, target, c)
        got = plan.after.num_params()
        assert got <= target and target - got < max_unit_cost(arch, c), (got, target)
        check_plan(plan, c)
        for s in plan.after.layers:
            assert s.num_heads >= c.min_heads and s.ffn_hidden_size >= min(c.min_ffn, 48)
            assert s.ffn_hidden_size % c.ffn_step == 0
        assert plan.after.hidden_size % c.hidden_multiple == 0
        assert select_global(scores, target, c).to_dict() == plan.to_dict()  # deterministic


def test_heads_are_pruned_within_groups_under_gqa():
    arch = arch_(layers=1, heads=12, kv=3)
    heads = torch.tensor([0.1, 0.2, 0.3, 0.4, 5, 6, 7, 8, 9, 10, 11, 12], dtype=torch.float64)
    scores = GroupScores(arch, heads=[heads], kv=[torch.full((3,), 100.0, dtype=torch.float64)],
                         ffn=[torch.full((48,), 100.0, dtype=torch.float64)], hidden=None)
    # group 0 holds the four cheapest heads, but every unit takes one head from each group
    target = arch.num_params() - 2 * 3 * G.head_cost(arch)
    plan = select_global(scores, target, Constraints())
    assert plan.heads[0].tolist() == [2, 3, 6, 7, 10, 11]
    assert plan.after.layers[0].num_heads == 6 and plan.after.layers[0].num_kv_groups == 3


def test_kv_groups_go_with_their_heads_and_tp_multiples():
    arch = arch_(layers=2, heads=8, kv=4)
    low = torch.tensor([0.0, 5.0, 0.0, 5.0], dtype=torch.float64)
    scores = GroupScores(arch, heads=[torch.full((8,), 1.0, dtype=torch.float64)] * 2, kv=[low, low + 9],
                         ffn=[torch.full((48,), 100.0, dtype=torch.float64)] * 2, hidden=None)
    c = Constraints(tensor_parallel=2)
    plan = select_global(scores, arch.num_params() - 2 * G.kv_cost(arch, 0), c)
    assert plan.kv[0].tolist() == [1, 3] and plan.heads[0].tolist() == [2, 3, 6, 7]
    assert plan.kv[1].tolist() == [0, 1, 2, 3]
    check_plan(plan, c)


def test_non_uniform_saliency_gives_non_uniform_widths():
    arch = arch_(layers=3)
    g = torch.Generator().manual_seed(1)
    ffn = [torch.rand(48, generator=g, dtype=torch.float64) * s for s in (10.0, 1.0, 0.1)]
    heads = [torch.rand(8, generator=g, dtype=torch.float64) * s for s in (0.01, 10.0, 10.0)]
    scores = GroupScores(arch, heads=heads, kv=[torch.ones(4, dtype=torch.float64) * 50] * 3, ffn=ffn,
                         hidden=torch.ones(64, dtype=torch.float64) * 1e6)
    plan = select_global(scores, int(arch.num_params() * 0.8), Constraints())
    f = [s.ffn_hidden_size for s in plan.after.layers]
    h = [s.num_heads for s in plan.after.layers]
    assert f[0] > f[1] > f[2]
    assert h[0] < h[1] and h[0] < h[2]
    assert not plan.after.is_uniform and plan.after.hidden_size == 64


def test_hidden_channels_compete_with_their_full_cost():
    arch = arch_(layers=2)
    hc, fc = G.hidden_cost(arch), G.ffn_cost(arch)
    ffn = [torch.full((48,), 1.0 * fc, dtype=torch.float64)] * 2  # ratio 1.0 per parameter
    hid = torch.full((64,), 2.0 * hc, dtype=torch.float64)
    hid[7] = 0.5 * hc  # cheaper per parameter than any FFN channel, though its score is far larger
    scores = GroupScores(arch, heads=[torch.full((8,), 1e9, dtype=torch.float64)] * 2,
                         kv=[torch.full((4,), 1e9, dtype=torch.float64)] * 2, ffn=ffn, hidden=hid)
    plan = select_global(scores, arch.num_params() - 1, Constraints())
    assert 7 not in plan.hidden.tolist() and plan.after.hidden_size == 63
    assert plan.removed_params() == hc
    plan = select_global(scores, arch.num_params() - hc - 1, Constraints())
    assert plan.after.hidden_size == 63 and sum(s.ffn_hidden_size for s in plan.after.layers) == 95


def test_last_head_needs_depth_pruning_and_floors_hold():
    arch = arch_(layers=3, heads=2, kv=1)
    scores = random_scores(arch, 3, hidden_scale=1e9, layer_scale=1.0)
    scores.layers[1] = 0.0  # the layer to drop
    one_head_layer = arch.layer_params(arch.layers[0].__class__(1, 1, 1, 0))
    tiny = arch.embedding_params() + arch.hidden_size + 2 * one_head_layer + 100  # < 3 minimal layers
    with pytest.raises(PruningError, match="cannot reach"):
        select_global(scores, tiny, Constraints(prune_hidden=False))
    plan = select_global(scores, tiny, Constraints(prune_hidden=False, allow_depth=True))
    assert 1 not in plan.kept_layers and plan.after.num_layers <= 2
    assert [s.source_index for s in plan.after.layers] == [l for l in plan.kept_layers]
    plan = select_global(scores, int(arch.num_params() * 0.9), Constraints(prune_hidden=False, min_heads=2, min_ffn=40))
    assert all(s.num_heads == 2 and s.ffn_hidden_size >= 40 for s in plan.after.layers)


def test_ties_are_broken_by_index():
    arch = arch_(layers=2)
    z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
    scores = GroupScores(arch, heads=[z(8)] * 2, kv=[z(4)] * 2, ffn=[z(48)] * 2, hidden=None)
    plan = select_global(scores, arch.num_params() - 3 * G.ffn_cost(arch), Constraints(prune_heads=False, prune_kv=False))
    assert plan.ffn[0].tolist() == list(range(3, 48)) and plan.ffn[1].tolist() == list(range(48))


def test_uniform_ratio_and_target():
    arch = arch_(layers=3, heads=12, kv=3, ffn=40)
    scores = random_scores(arch, 5)
    plan = select_uniform(scores, ratio=0.5)
    for l, s in enumerate(plan.after.layers):
        assert (s.num_heads, s.num_kv_groups, s.ffn_hidden_size) == (6, 3, 20)
        top = torch.topk(scores.ffn[l], 20).indices.sort().values
        assert torch.equal(plan.ffn[l], top)
    assert plan.after.hidden_size == 32 and plan.after.is_uniform
    target = int(arch.num_params() * 0.6)
    plan = select_uniform(scores, target_params=target, constraints=Constraints(ffn_multiple=4))
    assert plan.after.num_params() <= target and plan.after.is_uniform
    assert all(s.ffn_hidden_size % 4 == 0 for s in plan.after.layers)
    # a slightly smaller ratio would miss the target
    r = 1 - plan.after.layers[0].ffn_hidden_size / 40
    bigger = select_uniform(scores, ratio=max(0.0, r - 0.05), constraints=Constraints(ffn_multiple=4))
    assert bigger.after.num_params() > target
    no_hidden = select_uniform(scores, ratio=0.5, constraints=Constraints(prune_hidden=False), prune_kv=True)
    assert no_hidden.after.hidden_size == 64 and no_hidden.after.layers[0].num_kv_groups == 2


def test_adapt_pruner_update_rule():
    s = torch.tensor([0.0, 0.5, 0.98, 0.3], dtype=torch.float64)
    imp = torch.tensor([-0.9, -0.5, -0.1, -0.5], dtype=torch.float64)  # -mean cos
    new = adapt_pruner_update(s, imp, ds=0.1, A=0.02)
    ihat = torch.tensor([-1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(new, (s + 0.1 - 0.02 * ihat).clamp(0, 0.99))
    assert float(new[2]) == 0.99

    arch = arch_(layers=4, heads=12, kv=3, ffn=64)
    scores = random_scores(arch, 2)
    target = int(arch.num_params() * 0.7)
    plan, sp = select_adaptive(scores, imp, target, steps=10, A=0.02, constraints=Constraints(prune_hidden=False))
    assert plan.after.num_params() <= target
    f = [s.ffn_hidden_size for s in plan.after.layers]
    assert f[2] > f[1] == f[3] > f[0]  # the most important layer (least similar in/out) keeps most
    assert float(sp[0]) > float(sp[1]) > float(sp[2])
    lw = select_layerwise(scores, [0.0, 0.5, 0.25, 0.75])
    assert [s.ffn_hidden_size for s in lw.after.layers] == [64, 32, 48, 16]


def test_target_shape():
    arch = arch_(layers=2, heads=12, kv=3, ffn=40)
    scores = random_scores(arch, 7)
    plan = select_target_shape(scores, heads=6, kv=3, ffn=[10, 20], hidden=40)
    assert [(s.num_heads, s.num_kv_groups, s.ffn_hidden_size) for s in plan.after.layers] == [(6, 3, 10), (6, 3, 20)]
    assert plan.after.hidden_size == 40
    assert torch.equal(plan.hidden, torch.topk(scores.hidden, 40).indices.sort().values)
    for l in range(2):  # in each group the two best heads survive
        for g in range(3):
            grp = scores.heads[l][4 * g: 4 * g + 4]
            want = (torch.topk(grp, 2).indices + 4 * g).sort().values
            assert torch.equal(plan.heads[l][2 * g: 2 * g + 2], want)
    plan = select_target_shape(scores, heads=4, kv=1, ffn=40)
    assert plan.after.layers[0].num_kv_groups == 1
    with pytest.raises(PruningError, match="not divisible"):
        select_target_shape(scores, heads=5, kv=3, ffn=40)
    with pytest.raises(PruningError, match="can only shrink"):
        select_target_shape(scores, heads=6, kv=3, ffn=50)
