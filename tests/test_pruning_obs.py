"""OBS weight update after removing input columns, and layer Hessians from hooks."""
import pytest
import torch

from megatron_effllm.pruning.hooks import ActivationRecorder
from megatron_effllm.pruning.obs import (
    HessianAccumulator,
    apply_obs_update,
    damped_hessian,
    inverse_hessian,
    obs_greedy,
    obs_group_scores,
    obs_saliency,
    obs_update,
)
from megatron_effllm.pruning.saliency import merge_states
from megatron_effllm.pruning.surgery import slice_state_dict
from test_pruning_reference import hf_model, random_state_dict, tiny_arch, token_batch
from test_pruning_surgery import plan_for


def calib(seed, n=300, d_in=16, d_out=7):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=torch.float64) @ torch.randn(6, d_in, generator=g, dtype=torch.float64)
    X += 0.3 * torch.randn(n, d_in, generator=g, dtype=torch.float64)  # correlated inputs: OBS has work to do
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return X, W


def out_error(W_new, W, X):
    """Mean squared layer-output error over the calibration tokens."""
    return float(((X @ (W_new - W).T) ** 2).sum(1).mean())


@pytest.mark.parametrize("seed", range(6))
def test_block_update_beats_plain_removal_and_predicts_its_error(seed):
    X, W = calib(seed)
    g = torch.Generator().manual_seed(100 + seed)
    P = torch.randperm(16, generator=g)[: 2 + seed % 5]
    plain = W.clone()
    plain[:, P] = 0
    for damp in (0.0, 0.01, 0.1):
        H = damped_hessian(X.T @ X, X.shape[0], damp)
        new, s_p = obs_update(W, H, P)
        assert bool((new[:, P] == 0).all())
        assert out_error(new, W, X) <= out_error(plain, W, X) + 1e-12
        if damp == 0.0:  # S_P is exactly the output error of the update
            assert abs(out_error(new, W, X) - s_p) < 1e-8 * max(1.0, s_p)
            assert out_error(new, W, X) < 0.9 * out_error(plain, W, X)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("group_size", [1, 4])
def test_greedy_update_is_exact_for_its_own_choice(seed, group_size):
    X, W = calib(seed)
    H = damped_hessian(X.T @ X, X.shape[0], 0.01)
    k = 2
    removed, new = obs_greedy(W, H, k, group_size=group_size)
    assert removed.numel() == k and len(set(removed.tolist())) == k
    cols = (removed[:, None] * group_size + torch.arange(group_size)).reshape(-1)
    assert bool((new[:, cols] == 0).all())
    plain = W.clone()
    plain[:, cols] = 0
    assert out_error(new, W, X) <= out_error(plain, W, X) + 1e-12
    # one column group at a time with exact H^-1 downdates == the block update of the same set
    block, _ = obs_update(W, H, cols)
    assert torch.allclose(new, block, atol=1e-9)
    # the first pick is the cheapest group under the original H^-1
    groups = torch.arange(16).reshape(-1, group_size)
    s = obs_saliency(W, inverse_hessian(H), groups)
    assert int(removed[0]) == int(torch.argmin(s))
    assert abs(float(s[removed[0]]) - obs_update(W, H, groups[removed[0]])[1]) < 1e-9


def test_hessians_add_up_over_ranks_and_follow_a_prune():
    arch = tiny_arch("llama", False)
    sd = random_state_dict(arch)
    model = hf_model(arch, sd)
    ids = token_batch(arch, batch=4, seq=8)
    full, halves = HessianAccumulator(torch.float64), [HessianAccumulator(torch.float64) for _ in range(2)]
    captured = {}
    h = model.get_submodule("model.layers.1.mlp.down_proj").register_forward_pre_hook(
        lambda m, a: captured.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        with ActivationRecorder(model, arch, hessians=full, hessian_sites="all"):
            model(ids)
        for i, acc in enumerate(halves):
            with ActivationRecorder(model, arch, hessians=acc, hessian_sites="all"):
                model(ids[2 * i: 2 * i + 2])
    h.remove()
    merged = merge_states([a.state_dict() for a in halves])
    for k, v in full.state_dict().items():
        assert torch.allclose(merged[k], v), k
    x = captured["x"].reshape(-1, 24)[-16:]  # the last forward saw the second half
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(halves[1].state[f"xtx.{name}"], x.T @ x)
    assert float(full.state[f"n.{name}"]) == 32
    plan = plan_for(arch, "all")
    full.apply_plan(plan)
    keep = plan.ffn[1]
    assert torch.allclose(full.state[f"xtx.{name}"], merged[f"xtx.{name}"][keep][:, keep])
    assert full.state["xtx.model.layers.0.self_attn.q_proj.weight"].shape == (45, 45)


@pytest.mark.parametrize("kind", ["head", "kv", "ffn", "all"])
def test_model_update_lowers_each_layer_output_error(kind):
    arch = tiny_arch("qwen2", False)
    sd = random_state_dict(arch)
    model = hf_model(arch, sd)
    hess = HessianAccumulator(torch.float64)
    inputs = {}
    hooks = [model.get_submodule(f"model.layers.{l}.{m}").register_forward_pre_hook(
        lambda mod, a, key=(l, m): inputs.__setitem__(key, a[0].detach().reshape(-1, a[0].shape[-1])))
        for l in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    with torch.no_grad(), ActivationRecorder(model, arch, hessians=hess, hessian_sites="all"):
        model(token_batch(arch, batch=8, seq=16, seed=9))
    for h in hooks:
        h.remove()
    plan = plan_for(arch, kind)
    updated, errors = apply_obs_update(sd, plan, hess, damp=0.01, hidden=(kind == "all"))
    pruned, pruned_obs = slice_state_dict(sd, plan), slice_state_dict(updated, plan)
    d = arch.head_dim
    checked = 0
    for l in plan.kept_layers:
        for module, kept in (("self_attn.o_proj", (plan.heads[l][:, None] * d + torch.arange(d)).reshape(-1)),
                             ("mlp.down_proj", plan.ffn[l])):
            name = f"model.layers.{l}.{module}.weight"
            X = inputs[(l, module)]
            ref = X @ sd[name].T
            new_l = plan.kept_layers.index(l)
            key = f"model.layers.{new_l}.{module}.weight"
            rows = plan.hidden
            e_plain = ((X[:, kept] @ pruned[key].T - ref[:, rows]) ** 2).sum(1).mean()
            e_obs = ((X[:, kept] @ pruned_obs[key].T - ref[:, rows]) ** 2).sum(1).mean()
            if kept.numel() < X.shape[1]:
                assert e_obs < e_plain, (name, float(e_obs), float(e_plain))
                assert name in errors
                checked += 1
            else:
                assert torch.equal(pruned_obs[key], pruned[key])
    assert checked >= 1
    scores = obs_group_scores(sd, arch, hess)
    assert scores.kv is None and scores.hidden is None and scores.heads[0].numel() == 6
    assert bool((scores.ffn[1] > 0).all())


def test_event_compensation_in_steps_equals_one_block_update():
    """A training run removes columns over several events, downdating H^-1 in between
    (``event.obs_compensate``): two steps give the block update of both sets at once, and the
    downdated inverse is that of H over the remaining columns."""
    from megatron_effllm.pruning.event import obs_compensate

    X, W = calib(7, d_in=12)
    H = damped_hessian(X.T @ X, X.shape[0])
    unit = 2  # columns per unit (a head of two channels)
    alive = list(range(6))
    W1, alive1, Hinv1 = obs_compensate(W.clone(), inverse_hessian(H), alive, [1, 4], unit)
    assert alive1 == [0, 2, 3, 5]
    cols = [c for u in alive1 for c in (2 * u, 2 * u + 1)]
    assert torch.allclose(Hinv1, torch.linalg.inv(H[cols][:, cols]), rtol=1e-9, atol=1e-9)
    W2, alive2, _ = obs_compensate(W1, Hinv1, alive1, [3], unit)
    block, _ = obs_update(W, H, [2, 3, 8, 9, 6, 7])
    assert alive2 == [0, 2, 5]
    assert torch.allclose(W2, block, rtol=1e-9, atol=1e-9)
    assert bool((W2[:, [2, 3, 6, 7, 8, 9]] == 0).all())
