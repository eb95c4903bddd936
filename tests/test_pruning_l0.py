"""Hard-concrete L0 gates: sampling, expected counts, expected size, the Lagrangian."""
import math

import torch

from megatron_effllm.pruning import l0
from megatron_effllm.pruning.groups import PrunePlan
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
