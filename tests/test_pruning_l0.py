"""Hard-concrete L0 gates: sampling, expected counts, expected size, the Lagrangian."""
import math

import pytest
import torch

from megatron_effllm.pruning import l0
from megatron_effllm.pruning.groups import PrunePlan, PruningError
from megatron_effllm.pruning.surgery import plan_from_masks, full_masks
from test_pruning_reference import tiny_arch


def test_samples_lie_in_unit_interval_with_exact_zeros_and_ones():
    log_alpha = torch.linspace(-3, 3, 7, dtype=torch.float64)
    z = l0.sample_gates(log_alpha.expand(20000, 7), generator=torch.Generator().manual_seed(0))
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0
    assert bool(((z >= 0) & (z <= 1)).all())
    frac_zero = (z == 0).double().mean(0)
    assert bool((frac_zero[1:] < frac_zero[:-1]).all())  # larger log_alpha, fewer closed gates
    # differentiable in log_alpha (through the open gates)
    la = log_alpha.clone().requires_grad_(True)
    l0.sample_gates(la, u=torch.full((7,), 0.5, dtype=torch.float64)).sum().backward()
    assert la.grad is not None and float(la.grad.abs().sum()) > 0


def test_prob_nonzero_matches_monte_carlo():
    log_alpha = torch.tensor([-4.0, -1.0, 0.0, 0.7, 2.5], dtype=torch.float64)
    z = l0.sample_gates(log_alpha.expand(200000, 5), generator=torch.Generator().manual_seed(1))
    mc = (z > 0).double().mean(0)
    p = l0.prob_nonzero(log_alpha)
    assert torch.allclose(mc, p, atol=4e-3), (mc, p)
    # s > 0  <=>  logit(u) > beta * log(-l/r) - log_alpha
    assert torch.allclose(p, 1 - torch.sigmoid(l0.BETA * math.log(0.1 / 1.1) - log_alpha))


def test_expected_params_exact_for_binary_gates_and_unbiased_for_random_ones():
    arch = tiny_arch("qwen2", tie=False, layers=2)
    masks = full_masks(arch, dtype=torch.float64)
    masks["hidden"][[3, 7]] = 0
    masks["head.0"][[1, 4]] = 0  # one head per group
    masks["kv.1"][0] = 0
    masks["ffn.1"][:5] = 0
    plan = plan_from_masks(arch, masks)
    gates = dict(hidden=masks["hidden"], heads=[masks["head.0"], masks["head.1"]],
                 kv=[masks["kv.0"], masks["kv.1"]], ffn=[masks["ffn.0"], masks["ffn.1"]])
    assert float(l0.expected_params(arch, **gates)) == plan.after.num_params()
    layer_gate = torch.tensor([1.0, 0.0], dtype=torch.float64)
    dropped = PrunePlan.build(arch, [0], {0: range(6)}, {0: range(2)}, {0: range(24)}, range(48))
    assert float(l0.expected_params(arch, layers=layer_gate)) == dropped.after.num_params()
    assert float(l0.expected_params(arch)) == arch.num_params()

    g = torch.Generator().manual_seed(2)
    probs = dict(hidden=torch.rand(48, generator=g, dtype=torch.float64),
                 heads=[torch.rand(6, generator=g, dtype=torch.float64) for _ in range(2)],
                 kv=[torch.rand(2, generator=g, dtype=torch.float64) for _ in range(2)],
                 ffn=[torch.rand(24, generator=g, dtype=torch.float64) for _ in range(2)],
                 layers=torch.rand(2, generator=g, dtype=torch.float64))
    expected = float(l0.expected_params(arch, **probs))
    draws = []
    for _ in range(3000):
        b = lambda p: torch.bernoulli(p, generator=g)  # noqa: E731
        draws.append(float(l0.expected_params(
            arch, hidden=b(probs["hidden"]), heads=[b(p) for p in probs["heads"]], kv=[b(p) for p in probs["kv"]],
            ffn=[b(p) for p in probs["ffn"]], layers=b(probs["layers"]))))
    draws = torch.tensor(draws)
    assert abs(float(draws.mean()) - expected) < 4 * float(draws.std()) / math.sqrt(len(draws))


def test_deterministic_gates_keep_the_expected_count_of_largest_alphas():
    log_alpha = torch.tensor([2.0, -3.0, 0.5, 4.0, -0.2, 1.0, -5.0, 3.0], dtype=torch.float64)
    z = l0.deterministic_gates(log_alpha)
    keep = round(float(l0.prob_nonzero(log_alpha).sum()))
    assert int((z > 0).sum()) == keep
    kept = set(torch.nonzero(z).flatten().tolist())
    assert kept == set(torch.topk(log_alpha, keep).indices.tolist())
    assert bool(((z >= 0) & (z <= 1)).all())
    assert torch.equal(l0.deterministic_gates(log_alpha, keep=2) > 0,
                       torch.tensor([False, False, False, True, False, False, False, True]))
    slots = l0.expand_head_slots(torch.tensor([1.0, 0.0, 1.0]), num_kv_groups=2)
    assert slots.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]


def test_lagrangian_min_max_drives_expected_sparsity_to_target():
    arch = tiny_arch("llama", layers=2)
    total = arch.num_params()
    la_ffn = [torch.full((24,), 3.0, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    la_hid = torch.full((48,), 3.0, dtype=torch.float64, requires_grad=True)
    lam = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    target = 0.4

    def sparsity():
        p = l0.expected_params(arch, hidden=l0.prob_nonzero(la_hid), ffn=[l0.prob_nonzero(a) for a in la_ffn])
        return 1 - p / total

    gap0 = abs(sparsity().item() - target)
    opt_min = torch.optim.SGD(la_ffn + [la_hid], lr=2.0)
    opt_max = torch.optim.SGD([lam], lr=2.0, maximize=True)  # ascent on the multipliers
    for step in range(300):
        loss = l0.lagrangian(sparsity(), l0.target_sparsity(step, 100, target), lam[0], lam[1])
        opt_min.zero_grad(), opt_max.zero_grad()
        loss.backward()
        opt_min.step(), opt_max.step()
    final = sparsity().item()
    assert abs(final - target) < 0.1 * gap0, (final, gap0)
    assert l0.target_sparsity(50, 100, 0.4) == 0.2 and l0.target_sparsity(500, 100, 0.4) == 0.4
    value = l0.lagrangian(torch.tensor(0.5, dtype=torch.float64), 0.4, torch.tensor(2.0), torch.tensor(10.0))
    assert abs(float(value) - (2.0 * 0.1 + 10.0 * 0.1 ** 2)) < 1e-12


def test_noise_generator_reproduces_draws_by_keys_only():
    a = torch.rand(5, generator=l0.noise_generator(1234, 7, 0))
    torch.manual_seed(99)  # the global random state plays no part
    assert torch.equal(a, torch.rand(5, generator=l0.noise_generator(1234, 7, 0)))
    for keys in ((1234, 7, 1), (1234, 8, 0), (1235, 7, 0)):
        assert not torch.equal(a, torch.rand(5, generator=l0.noise_generator(*keys)))
    assert l0.init_log_alpha(0.5) == 0.0 and l0.init_log_alpha(0.2) > 0


def test_gate_values_are_the_deterministic_values_of_kept_gates():
    log_alpha = torch.tensor([-4.0, -1.0, 0.0, 1.5, 6.0], dtype=torch.float64)
    v = l0.gate_values(log_alpha)
    assert float(v[0]) == 0.0 and float(v[-1]) == 1.0 and abs(float(v[2]) - 0.5) < 1e-12
    z = l0.deterministic_gates(log_alpha, keep=5)
    assert torch.equal(z, v)


def test_expected_architecture_rounds_expected_counts():
    arch = tiny_arch("llama", layers=2)  # 6 heads in 2 groups, FFN 24, hidden 48
    heads = [l0.expand_head_slots(torch.tensor([1.0, 0.9, 0.2], dtype=torch.float64), 2),
             l0.expand_head_slots(torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64), 2)]
    ffn = [torch.full((24,), 0.5, dtype=torch.float64), torch.zeros(24, dtype=torch.float64)]
    got = l0.expected_architecture(arch, heads=heads, ffn=ffn, hidden=torch.full((48,), 0.75, dtype=torch.float64))
    assert [(s.num_heads, s.num_kv_groups, s.ffn_hidden_size) for s in got.layers] == [(4, 2, 12), (2, 2, 1)]
    assert got.hidden_size == 36
    assert l0.expected_architecture(arch) == arch


def test_uniform_widths_meet_the_target_with_the_learned_proportions():
    from megatron_effllm.architecture import LayerShape
    from megatron_effllm.pruning.selection import Constraints

    arch = tiny_arch("llama", layers=3, heads=8, kv=2, ffn=32, hidden=48)
    g = torch.Generator().manual_seed(3)
    # the gates keep most heads and hidden channels, few FFN channels
    heads = [l0.expand_head_slots(0.8 + 0.2 * torch.rand(4, generator=g, dtype=torch.float64), 2) for _ in range(3)]
    ffn = [0.3 * torch.rand(32, generator=g, dtype=torch.float64) for _ in range(3)]
    hidden = 0.9 + 0.1 * torch.rand(48, generator=g, dtype=torch.float64)
    c = Constraints(min_ffn=4, ffn_multiple=4)

    def count(widths, D):
        return arch.replace(hidden_size=D, layers=tuple(
            LayerShape(k * h, k, f, i) for i, (k, h, f) in enumerate(widths))).num_params()

    previous = 0
    for frac in (0.5, 0.6, 0.8):
        target = int(frac * arch.num_params())
        widths, D = l0.uniform_widths(arch, target, c, heads=heads, ffn=ffn, hidden=hidden)
        assert len(set(widths)) == 1  # the same shape in every layer
        kv, hpg, f = widths[0]
        assert kv == 2 and 1 <= hpg <= 4 and f % 4 == 0 and 4 <= f <= 32 and 1 <= D <= 48
        n = count(widths, D)
        assert previous <= n <= target
        previous = n
        assert f / 32 < hpg / 4 and f / 32 < D / 48  # FFN, whose gates closed, lost most
    # close to the target: one more FFN step in every layer would overshoot, or FFN is full
    widths, D = l0.uniform_widths(arch, int(0.6 * arch.num_params()), c, heads=heads, ffn=ffn, hidden=hidden)
    kv, hpg, f = widths[0]
    assert f == 32 or count([(kv, hpg, f + 4)] * 3, D) > int(0.6 * arch.num_params())
    # kinds without probabilities keep their widths; the floors bound what is reachable
    widths, D = l0.uniform_widths(arch, int(0.8 * arch.num_params()), c, ffn=ffn)
    assert D == 48 and widths[0][:2] == (2, 4)
    with pytest.raises(PruningError, match="floors stop at"):
        l0.uniform_widths(arch, 100, c, heads=heads, ffn=ffn, hidden=hidden)


def _gated_logits(arch, sd, ids, heads, ffn, hidden):
    """The reference forward with gates on o_proj / down_proj inputs and on the residual stream's
    writers, RMSNorm statistics over the open hidden channels."""
    from test_pruning_reference import _rms, _rope

    d, eps = arch.head_dim, arch.rms_norm_eps
    mask = (hidden != 0).double()
    x = sd["model.embed_tokens.weight"][ids] * hidden
    B, T = ids.shape
    causal = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)
    for i, s in enumerate(arch.layers):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps, mask)
        proj = lambda n: h @ sd[p + f"self_attn.{n}_proj.weight"].T  # noqa: E731
        q = _rope(proj("q").view(B, T, s.num_heads, d).transpose(1, 2), arch.rope_theta, d)
        k = _rope(proj("k").view(B, T, s.num_kv_groups, d).transpose(1, 2), arch.rope_theta, d)
        v = proj("v").view(B, T, s.num_kv_groups, d).transpose(1, 2)
        rep = s.heads_per_group
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, -1)
        o = (att @ v).transpose(1, 2).reshape(B, T, s.num_heads * d) * heads[i].repeat_interleave(d)
        x = x + (o @ sd[p + "self_attn.o_proj.weight"].T) * hidden
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps, mask)
        g = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
        x = x + ((g * ffn[i]) @ sd[p + "mlp.down_proj.weight"].T) * hidden
    x = _rms(x, sd["model.norm.weight"], eps, mask)
    head = sd["model.embed_tokens.weight"] if arch.tie_word_embeddings else sd["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize("tie", [False, True])
def test_folded_gates_give_the_gated_model_and_slice_to_the_pruned_one(tie):
    from megatron_effllm.pruning.surgery import slice_state_dict
    from test_pruning_reference import random_state_dict, reference_logits, token_batch

    arch = tiny_arch("llama", tie=tie, layers=2)  # 6 heads / 2 groups, FFN 24, hidden 48
    sd = random_state_dict(arch, seed=4)
    ids = token_batch(arch)
    g = torch.Generator().manual_seed(5)
    vals = lambda n: l0.gate_values(torch.randn(n, generator=g, dtype=torch.float64) * 3)  # noqa: E731
    slots = [vals(3) for _ in range(2)]
    slots[0][1] = 0.0  # a closed slot: that head goes in both groups
    heads = [l0.expand_head_slots(s, 2) for s in slots]
    ffn = [vals(24) for _ in range(2)]
    hidden = vals(48)
    hidden[[2, 9]] = 0.0
    want = _gated_logits(arch, sd, ids, heads, ffn, hidden)
    folded = l0.fold_gates(sd, arch, heads=heads, ffn=ffn, hidden=hidden)
    got = reference_logits(arch, folded, ids, hidden_mask=(hidden != 0).double())
    assert (got - want).abs().max() < 1e-9
    # the closed groups are exactly zero now: slicing them away keeps the function
    masks = full_masks(arch, dtype=torch.float64)
    masks["hidden"] = (hidden != 0).double()
    for l in range(2):
        masks[f"head.{l}"] = (heads[l] != 0).double()
        masks[f"ffn.{l}"] = (ffn[l] != 0).double()
    plan = plan_from_masks(arch, masks)
    assert plan.after.hidden_size == int((hidden != 0).sum()) <= 46 and plan.after.layers[0].num_heads <= 4
    small = slice_state_dict(folded, plan)
    assert (reference_logits(plan.after, small, ids) - want).abs().max() < 1e-9
