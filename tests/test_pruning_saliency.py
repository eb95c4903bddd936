"""Saliency estimators against direct computations, and their data-parallel additivity."""
import pytest
import torch

from megatron_effllm import layout
from megatron_effllm.pruning import groups as G
from megatron_effllm.pruning.hooks import ActivationRecorder, weights_and_grads
from megatron_effllm.pruning.obs import HessianAccumulator
from megatron_effllm.pruning.estimators.base import Statistics
from megatron_effllm.pruning.estimators.magnitude import magnitude_scores
from megatron_effllm.pruning.registry import ESTIMATORS
from megatron_effllm.pruning.saliency import ActivationSaliency, GradSaliency, merge_states, normalise_importance
from megatron_effllm.pruning.surgery import slice_group_vectors
from test_pruning_reference import hf_model, random_state_dict, reference_logits, tiny_arch, token_batch
from test_pruning_surgery import plan_for


def lm_loss(arch, sd, ids):
    logits = reference_logits(arch, sd, ids)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, arch.vocab_size), ids[:, 1:].reshape(-1))


def grads_of(arch, sd, ids):
    params = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    loss = lm_loss(arch, params, ids)
    loss.backward()
    return {k: p.grad for k, p in params.items()}, loss.item()


def direct_group_sum(arch, elementwise, kind, layer, index):
    """Sum of an element-wise quantity over the parameters a group owns (each element once)."""
    masks = {}
    for name, dim, idx in G.owned_slices(arch, kind, layer, index):
        m = masks.setdefault(name, torch.zeros(elementwise[name].shape, dtype=torch.bool))
        m.index_fill_(dim, idx, True)
    return sum(float(elementwise[n][m].sum()) for n, m in masks.items())


def all_groups(arch):
    for l, s in enumerate(arch.layers):
        for h in range(s.num_heads):
            yield "head", l, h
        for c in range(0, s.ffn_hidden_size, 5):
            yield "ffn", l, c
    for c in range(0, arch.hidden_size, 7):
        yield "hidden", None, c


def score_of(scores, kind, layer, i):
    if kind == "hidden":
        return float(scores.hidden[i])
    return float({"head": scores.heads, "kv": scores.kv, "ffn": scores.ffn}[kind][layer][i])


@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True)])
def test_signed_taylor_is_the_directional_derivative_of_the_loss(family, tie):
    arch = tiny_arch(family, tie)
    sd = random_state_dict(arch)
    ids = token_batch(arch, batch=3, seq=12)
    grads, loss0 = grads_of(arch, sd, ids)
    acc = GradSaliency(arch, ["taylor"])
    acc.update(sd, grads, count=3)
    eps = 1e-6
    cases = [("head", 0, 4), ("ffn", 1, 7), ("hidden", None, 5), ("kv", 1, 0)]
    for kind, layer, i in cases:
        shrunk = dict(sd)
        for name, dim, idx in G.owned_slices(arch, kind, layer, [i]):
            if kind == "kv" and "q_proj" in name or kind == "kv" and "o_proj" in name:
                continue  # scores.kv covers the group's own k/v rows
            m = torch.ones_like(sd[name])
            m.index_fill_(dim, idx, 1 - eps)
            shrunk[name] = shrunk[name] * m
        # the hidden group's embedding column and (tied) lm_head are one tensor: shrunk once
        slope = (lm_loss(arch, shrunk, ids).item() - loss0) / (-eps)  # dL/d(scale) at scale = 1 is sum w*g
        key = "hidden" if kind == "hidden" else f"{kind}.{layer}"
        signed = float(acc.state[f"wg.{key}"][i] if kind != "hidden" else acc.state["wg.hidden"][i]) / 3
        assert abs(signed - slope) < 1e-5 * max(1.0, abs(slope)), (kind, signed, slope)
        assert abs(score_of(acc.scores("taylor"), kind, layer, i) - abs(slope)) < 1e-5 * max(1.0, abs(slope))


def test_taylor_ranks_ffn_channels_like_the_actual_loss_change():
    """Zeroing one FFN channel of a model with small FFN weights: the loss change is first order."""
    arch = tiny_arch("llama", False, ffn=32)
    sd = random_state_dict(arch, seed=3)
    for l in range(arch.num_layers):
        sd[f"model.layers.{l}.mlp.down_proj.weight"] *= 0.05
    ids = token_batch(arch, batch=4, seq=16, seed=5)
    grads, loss0 = grads_of(arch, sd, ids)
    acc = GradSaliency(arch)
    acc.update(sd, grads, count=4)
    pred_signed = (acc.state["wg.ffn.0"] / 4).tolist()
    actual = []
    for c in range(32):
        z = dict(sd)
        for name, dim, idx in G.owned_slices(arch, "ffn", 0, [c]):
            z[name] = z[name].index_fill(dim, idx, 0.0)
        actual.append(lm_loss(arch, z, ids).item() - loss0)
    actual, pred = torch.tensor(actual), -torch.tensor(pred_signed)  # Delta L ~= -sum w g
    # A channel's output is a product of its gate, up and down weights, so the group's first-order
    # term (scaling all three) is about 2-3x the change from removing it; sign and order must agree.
    big = actual.abs() > 0.2 * actual.abs().max()
    assert bool((torch.sign(pred[big]) == torch.sign(actual[big])).all())
    ratio = pred[big] / actual[big]
    assert float(ratio.min()) > 1.0 and float(ratio.max()) < 4.0, ratio
    rank = lambda v: torch.argsort(torch.argsort(v)).double()  # noqa: E731
    corr = torch.corrcoef(torch.stack([rank(acc.scores("taylor").ffn[0]), rank(actual.abs())]))[0, 1]
    print("rank correlation", float(corr))
    assert corr > 0.9


def test_fisher_and_elementwise_taylor_equal_explicit_per_sample_sums():
    arch = tiny_arch("qwen2", False)
    sd = random_state_dict(arch)
    ids = token_batch(arch, batch=4, seq=10)
    acc = GradSaliency(arch)
    per_sample = []
    for s in range(4):
        g, _ = grads_of(arch, sd, ids[s : s + 1])
        per_sample.append(g)
        acc.update(sd, g, count=1)
    fisher = {k: sd[k] ** 2 * torch.stack([g[k] ** 2 for g in per_sample]).mean(0) for k in sd}
    awg = {k: torch.stack([(sd[k] * g[k]).abs() for g in per_sample]).mean(0) for k in sd}
    wg = {k: torch.stack([sd[k] * g[k] for g in per_sample]).mean(0) for k in sd}
    f, e, t, mix = (acc.scores(x) for x in ("fisher", "taylor_elem", "taylor", "mix"))
    for kind, layer, i in all_groups(arch):
        want_f = 0.5 * direct_group_sum(arch, fisher, kind, layer, [i])
        assert abs(score_of(f, kind, layer, i) - want_f) <= 1e-9 * max(1, want_f)
        want_e = direct_group_sum(arch, awg, kind, layer, [i])
        assert abs(score_of(e, kind, layer, i) - want_e) <= 1e-9 * max(1, want_e)
        first = direct_group_sum(arch, wg, kind, layer, [i])
        assert abs(score_of(t, kind, layer, i) - abs(first)) <= 1e-9
        assert abs(score_of(mix, kind, layer, i) - abs(first - want_f)) <= 1e-9
    # KV scores are the group's own k/v rows
    own = lambda q, l, g: sum(float(q[f"model.layers.{l}.self_attn.{p}_proj.{w}"].reshape(2, -1)[g].sum())  # noqa: E731
                              for p in "kv" for w in ("weight", "bias"))
    assert abs(float(f.kv[1][1]) - 0.5 * own(fisher, 1, 1)) < 1e-9
    # layer scores cover the whole block
    block = sum(float(v.sum()) for k, v in fisher.items() if k.startswith("model.layers.0."))
    assert abs(float(f.layers[0]) - 0.5 * block) < 1e-9


def test_magnitude_scores_are_sums_of_squares():
    arch = tiny_arch("llama", True)
    sd = random_state_dict(arch)
    m = magnitude_scores(sd, arch)
    sq = {k: v ** 2 for k, v in sd.items()}
    for kind, layer, i in all_groups(arch):
        assert abs(score_of(m, kind, layer, i) - direct_group_sum(arch, sq, kind, layer, [i])) < 1e-9


def test_gradient_accumulators_add_up_over_data_parallel_ranks():
    arch = tiny_arch("llama", False)
    sd = random_state_dict(arch)
    ids = token_batch(arch, batch=4, seq=10)
    full_g, _ = grads_of(arch, sd, ids)
    halves = [grads_of(arch, sd, ids[:2])[0], grads_of(arch, sd, ids[2:])[0]]
    # the first-order sums are linear: two ranks' half batches == one full-batch gradient
    full = GradSaliency(arch, ["taylor"])
    full.update(sd, full_g, count=4)
    ranks = [GradSaliency(arch, ["taylor"]) for _ in range(2)]
    for r, g in zip(ranks, halves):
        r.update(sd, g, count=2)
    merged = merge_states([r.state_dict() for r in ranks])
    for k, v in full.state_dict().items():
        assert torch.allclose(merged[k], v, rtol=1e-10, atol=1e-12), k
    # every estimator, with an EMA step in between: rank-wise micro-batches == one process seeing them all
    one = GradSaliency(arch)
    ranks = [GradSaliency(arch) for _ in range(2)]
    for step in range(2):
        for acc in [one] + ranks:
            acc.decay_(0.9)
        for r, g in zip(ranks, halves):
            r.update(sd, {k: v * (step + 1) for k, v in g.items()}, count=2)
            one.update(sd, {k: v * (step + 1) for k, v in g.items()}, count=2)
    merged = merge_states([r.state_dict() for r in ranks])
    for k, v in one.state_dict().items():
        assert torch.allclose(merged[k], v, rtol=1e-12, atol=1e-15), k
    loaded = GradSaliency(arch)
    loaded.load_state_dict(merged)
    for est in ("taylor", "taylor_elem", "fisher", "mix"):
        a, b = loaded.scores(est), one.scores(est)
        assert all(torch.allclose(x, y) for x, y in zip(a.ffn + a.heads + [a.hidden], b.ffn + b.heads + [b.hidden]))


def test_tensor_parallel_shards_sum_to_the_full_accumulator():
    arch = tiny_arch("qwen2", False)
    sd = random_state_dict(arch)
    grads, _ = grads_of(arch, sd, token_batch(arch))
    full = GradSaliency(arch)
    full.update(sd, grads, count=2)
    ranks = [GradSaliency(arch) for _ in range(2)]
    shards = [({}, {}, {}) for _ in range(2)]  # per rank: weights, grads, offsets
    for name in sd:
        axes = G.tensor_axes(arch)[name]
        # column-parallel (q/k/v/gate/up rows, qkv biases) and row-parallel (o/down columns) shards
        split_dim = 0 if axes[0] is not None and axes[0].kind in ("head", "kv", "ffn") else (
            1 if len(axes) > 1 and axes[1] is not None and axes[1].kind in ("head", "ffn") else None)
        if split_dim is None:  # replicated on every TP rank: fed by rank 0 only
            shards[0][0][name], shards[0][1][name] = sd[name], grads[name]
            continue
        n = sd[name].shape[split_dim] // 2
        for r in range(2):
            w, g, off = shards[r]
            w[name] = sd[name].narrow(split_dim, r * n, n)
            g[name] = grads[name].narrow(split_dim, r * n, n)
            off[name] = {split_dim: r * n}
    for r, (w, g, off) in enumerate(shards):
        ranks[r].update(w, g, count=2, offsets=off, add_count=(r == 0))
    merged = merge_states([r.state_dict() for r in ranks])
    for k, v in full.state_dict().items():
        assert torch.allclose(merged[k], v, rtol=1e-10, atol=1e-13), k
    assert not torch.allclose(ranks[0].state["wg.hidden"], full.state["wg.hidden"])  # partial sums


def test_accumulator_follows_a_prune():
    arch = tiny_arch("llama", False)
    sd = random_state_dict(arch)
    grads, _ = grads_of(arch, sd, token_batch(arch))
    acc = GradSaliency(arch)
    acc.update(sd, grads)
    before = acc.state_dict()
    plan = plan_for(arch, "all")
    acc.apply_plan(plan)
    assert acc.arch == plan.after
    assert torch.equal(acc.state["wg.ffn.0"], before["wg.ffn.0"][plan.ffn[0]])
    assert torch.equal(acc.state["w2g2.head.1"], before["w2g2.head.1"][plan.heads[1]])
    s = acc.scores("mix")
    assert [v.numel() for v in s.heads] == [l.num_heads for l in plan.after.layers]
    assert s.hidden.numel() == plan.after.hidden_size
    assert slice_group_vectors(before, plan).keys() == acc.state.keys()


def test_activation_statistics_from_hooks_match_direct_computation():
    arch = tiny_arch("llama", False, layers=3)
    sd = random_state_dict(arch)
    model = hf_model(arch, sd)
    ids = token_batch(arch, batch=4, seq=9)
    captured = {}
    handles = [model.get_submodule(f"model.layers.{l}.{site}").register_forward_pre_hook(
        lambda m, a, key=(l, site): captured.__setitem__(key, a[0].detach()))
        for l in range(3) for site in ("self_attn.o_proj", "mlp.down_proj")]
    handles += [model.get_submodule(f"model.layers.{l}.{n}").register_forward_hook(
        lambda m, a, o, key=(l, n): captured.__setitem__(key, o.detach()))
        for l in range(3) for n in ("input_layernorm", "post_attention_layernorm")]
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: captured.__setitem__("final", o.detach())))

    acts = ActivationSaliency(arch)
    halves = [ActivationSaliency(arch) for _ in range(2)]
    with torch.no_grad():
        with ActivationRecorder(model, arch, activations=acts):
            out = model(ids, output_hidden_states=True)
        for i, h in enumerate(halves):
            with ActivationRecorder(model, arch, activations=h):
                model(ids[2 * i : 2 * i + 2])
        model(ids)  # refresh the captured full-batch tensors
    for h in handles:
        h.remove()
    n = ids.numel()
    s = ESTIMATORS.get("activation").scores(Statistics(activations=acts), arch, {})
    d = arch.head_dim
    for l in range(3):
        o = captured[(l, "self_attn.o_proj")].reshape(n, -1, d)
        assert torch.allclose(s.heads[l], o.norm(dim=-1).sum(0) / n)
        assert torch.allclose(s.ffn[l], captured[(l, "mlp.down_proj")].reshape(n, -1).abs().sum(0) / n)
    hid = sum(captured[(l, k)].abs().reshape(n, -1).sum(0) for l in range(3)
              for k in ("input_layernorm", "post_attention_layernorm")) + captured["final"].abs().reshape(n, -1).sum(0)
    assert torch.allclose(s.hidden, hid / n)
    hs = out.hidden_states  # hs[l] enters layer l; the last entry is after the final norm
    for l in range(2):
        cos = torch.nn.functional.cosine_similarity(hs[l].reshape(n, -1), hs[l + 1].reshape(n, -1), dim=-1).mean()
        assert abs(float(acts.layer_cosine()[l]) - float(cos)) < 1e-9
    assert s.kv is None and torch.allclose(s.layers, 1 - acts.layer_cosine())
    merged = merge_states([h.state_dict() for h in halves])
    for k, v in acts.state_dict().items():
        assert torch.allclose(merged[k], v, rtol=1e-9), k
    imp = normalise_importance(acts.layer_importance())
    assert float(imp.min()) == -1.0 and float(imp.max()) == 1.0


def test_hf_model_weights_and_grads_feed_the_accumulator():
    arch = tiny_arch("qwen2", True)
    sd = random_state_dict(arch)
    model = hf_model(arch, sd)
    ids = token_batch(arch)
    model(ids, labels=ids).loss.backward()
    weights, grads = weights_and_grads(model, arch)
    assert set(weights) == set(layout.canonical_shapes(arch)) and "lm_head.weight" not in weights
    acc = GradSaliency(arch, ["taylor"])
    acc.update(weights, grads, count=2)
    want, _ = grads_of(arch, sd, ids)
    ref = GradSaliency(arch, ["taylor"])
    ref.update(sd, want, count=2)
    for k, v in ref.state_dict().items():
        assert torch.allclose(acc.state[k], v, rtol=1e-4, atol=1e-8), k
    hess = HessianAccumulator(dtype=torch.float64)
    with torch.no_grad(), ActivationRecorder(model, arch, hessians=hess, hessian_sites="all"):
        model(ids)
    assert "model.layers.1.mlp.gate_proj.weight" in hess.names()
    assert hess.hessian("model.layers.1.mlp.up_proj.weight").shape == (48, 48)
