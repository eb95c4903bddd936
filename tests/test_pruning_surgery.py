"""Groups, costs, masking and physical removal on tiny Llama (GQA) and Qwen2 (qkv bias) models."""
import pytest
import torch

from megatron_effllm import layout
from megatron_effllm.pruning import groups as G
from megatron_effllm.pruning.groups import PrunePlan, PruningError
from megatron_effllm.pruning.hooks import install_mask_hooks
from megatron_effllm.pruning.surgery import (
    full_masks,
    mask_state_dict,
    masks_from_plan,
    plan_from_masks,
    slice_group_vectors,
    slice_state_dict,
)
from test_pruning_reference import hf_model, random_state_dict, reference_logits, tiny_arch, token_batch

FAMILIES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)]


def plan_for(arch, kind):
    """A plan removing some groups of one kind (tiny arch: 2 layers, 6 heads / 2 KV groups, ffn 24, hidden 48)."""
    L = range(arch.num_layers)
    heads = {l: list(range(arch.layers[l].num_heads)) for l in L}
    kv = {l: list(range(arch.layers[l].num_kv_groups)) for l in L}
    ffn = {l: list(range(arch.layers[l].ffn_hidden_size)) for l in L}
    hidden = list(range(arch.hidden_size))
    layers = list(L)
    if kind in ("head", "all"):
        heads[0] = [0, 2, 3, 5]  # one head from each KV group (group 0: 0,1,2; group 1: 3,4,5)
    if kind in ("kv", "all"):
        kv[1], heads[1] = [1], [3, 4, 5]
    if kind in ("ffn", "all"):
        ffn[0] = [c for c in ffn[0] if c not in (2, 5, 7)]
        ffn[1] = [c for c in ffn[1] if c not in (0, 23)]
    if kind in ("hidden", "all"):
        hidden = [c for c in hidden if c not in (1, 4, 30)]
    if kind == "layer":
        layers = [1]
    return PrunePlan.build(arch, layers, heads, kv, ffn, hidden)


KINDS = ["head", "kv", "ffn", "hidden", "layer", "all"]


@pytest.mark.parametrize("family,tie", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_masked_forward_equals_pruned_forward(family, tie, kind):
    arch = tiny_arch(family, tie)
    sd = random_state_dict(arch)
    plan = plan_for(arch, kind)
    ids = token_batch(arch)
    masks = masks_from_plan(plan, dtype=torch.float64)
    masked = reference_logits(arch, mask_state_dict(sd, arch, masks), ids, hidden_mask=masks["hidden"])
    pruned_sd = slice_state_dict(sd, plan)
    pruned = reference_logits(plan.after, pruned_sd, ids)
    assert (masked - pruned).abs().max() < 1e-10
    # and the prune really changes the model
    assert (pruned - reference_logits(arch, sd, ids)).abs().max() > 1e-3
    assert set(pruned_sd) == set(layout.canonical_shapes(plan.after))
    layout.check_state_dict(plan.after, pruned_sd)
    assert ("lm_head.weight" in pruned_sd) == (not tie) and plan.after.tie_word_embeddings == tie


@pytest.mark.parametrize("family,tie", FAMILIES)
@pytest.mark.parametrize("kind", ["head", "kv", "hidden", "all"])
def test_hook_masks_on_transformers_model_equal_pruned(family, tie, kind):
    arch = tiny_arch(family, tie)
    sd = random_state_dict(arch)
    plan = plan_for(arch, kind)
    ids = token_batch(arch)
    model = hf_model(arch, sd)
    handles = install_mask_hooks(model, arch, masks_from_plan(plan, dtype=torch.float64))
    with torch.no_grad():
        masked = model(ids).logits
    for h in handles:
        h.remove()
    small = slice_state_dict(sd, plan)
    pruned = reference_logits(plan.after, small, ids)
    assert (masked - pruned).abs().max() < 1e-5  # HF keeps norm statistics and softmax in fp32
    with torch.no_grad():  # the physically pruned (non-uniform) transformers model
        assert (hf_model(plan.after, small)(ids).logits - masked).abs().max() < 1e-5
    with torch.no_grad():  # hooks removed: the model is whole again
        assert (model(ids).logits - reference_logits(arch, sd, ids)).abs().max() < 1e-5


def test_uniform_pruned_model_loads_in_transformers_and_stays_tied():
    arch = tiny_arch("llama", tie=True)
    sd = random_state_dict(arch)
    plan = PrunePlan.build(arch, [0, 1], {0: [1, 2, 4, 5], 1: [0, 1, 3, 4]}, {0: [0, 1], 1: [0, 1]},
                           {0: list(range(0, 24, 2)), 1: list(range(1, 24, 2))}, list(range(0, 48, 2)))
    assert plan.after.is_uniform and plan.after.hidden_size == 24
    small = slice_state_dict(sd, plan)
    ids = token_batch(arch)
    model = hf_model(plan.after, small)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        got = model(ids).logits
    masks = masks_from_plan(plan, dtype=torch.float64)
    want = reference_logits(arch, mask_state_dict(sd, arch, masks), ids, hidden_mask=masks["hidden"])
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("family,tie", FAMILIES)
def test_group_costs_match_parameter_counts(family, tie):
    arch = tiny_arch(family, tie, layers=3)
    drop_0_2 = PrunePlan.build(arch, [1], {1: range(6)}, {1: range(2)}, {1: range(24)}, range(48))
    # per kind: (plan removing it, closed-form cost, the removed groups for an element count)
    cases = {
        "head": (plan_for(arch, "head"), 2 * G.head_cost(arch), [("head", 0, [1, 4])]),
        "kv": (plan_for(arch, "kv"), G.kv_cost(arch, 1), [("kv", 1, [0])]),
        "ffn": (plan_for(arch, "ffn"), 5 * G.ffn_cost(arch), [("ffn", 0, [2, 5, 7]), ("ffn", 1, [0, 23])]),
        "hidden": (plan_for(arch, "hidden"), 3 * G.hidden_cost(arch), [("hidden", None, [1, 4, 30])]),
        "layer": (drop_0_2, G.layer_cost(arch, 0) + G.layer_cost(arch, 2), [("layer", None, [0, 2])]),
    }
    for kind, (plan, cost, owned) in cases.items():
        assert arch.num_params() - plan.after.num_params() == cost, kind
        assert plan.removed_params() == cost, kind
        assert sum(G.owned_param_count(arch, k, l, idx) for k, l, idx in owned) == cost, kind
    assert G.group_cost(arch, "kv", 0) == G.kv_own_cost(arch) + 3 * G.head_cost(arch)


def test_hidden_cost_counts_the_current_widths():
    arch = tiny_arch("qwen2", tie=False)
    plan = plan_for(arch, "all")
    small = plan.after
    one = PrunePlan.build(small, range(small.num_layers),
                          {l: range(s.num_heads) for l, s in enumerate(small.layers)},
                          {l: range(s.num_kv_groups) for l, s in enumerate(small.layers)},
                          {l: range(s.ffn_hidden_size) for l, s in enumerate(small.layers)}, range(1, small.hidden_size))
    assert small.num_params() - one.after.num_params() == G.hidden_cost(small)
    assert G.owned_param_count(small, "hidden", None, [0]) == G.hidden_cost(small)


def test_optimizer_state_dicts_are_sliced_like_the_weights():
    arch = tiny_arch("qwen2", tie=False)
    sd = random_state_dict(arch)
    plan = plan_for(arch, "all")
    exp_avg = {k: 2 * v + 1 for k, v in sd.items()}
    small, small_avg = slice_state_dict(sd, plan), slice_state_dict(exp_avg, plan)
    for k in small:
        assert torch.equal(small_avg[k], 2 * small[k] + 1)
    with pytest.raises(PruningError, match="non-canonical"):
        slice_state_dict({**exp_avg, "step": torch.tensor(3.0)}, plan)
    kept = slice_state_dict({**exp_avg, "step": torch.tensor(3.0)}, plan, unknown="keep")
    assert float(kept["step"]) == 3.0
    # layer renumbering
    plan = plan_for(arch, "layer")
    small = slice_state_dict(sd, plan)
    assert torch.equal(small["model.layers.0.mlp.up_proj.weight"], sd["model.layers.1.mlp.up_proj.weight"])
    assert "model.layers.1.mlp.up_proj.weight" not in small


def test_masks_and_plans_round_trip_and_reject_unequal_gqa():
    arch = tiny_arch("llama")
    plan = plan_for(arch, "all")
    again = plan_from_masks(arch, masks_from_plan(plan))
    assert again.after == plan.after and again.kept_layers == plan.kept_layers
    for l in plan.kept_layers:
        assert torch.equal(again.heads[l], plan.heads[l]) and torch.equal(again.ffn[l], plan.ffn[l])
    assert torch.equal(again.hidden, plan.hidden)
    assert PrunePlan.from_dict(plan.to_dict()).after == plan.after
    m = full_masks(arch)
    m["head.0"][1] = 0  # one head from group 0 only
    with pytest.raises(PruningError, match="differ; GQA"):
        plan_from_masks(arch, m)
    with pytest.raises(PruningError, match="a head goes with its group"):
        PrunePlan.build(arch, [0, 1], {0: [0, 1, 2], 1: range(6)}, {0: [0, 1], 1: [0, 1]}, {0: range(24), 1: range(24)}, range(48))
    # group vectors (mask dicts, saliency sums) follow the plan
    vec = slice_group_vectors({f"x.{k}": v for k, v in masks_from_plan(plan).items()}, plan)
    assert all(bool((v == 1).all()) for v in vec.values())
    assert vec["x.head.0"].numel() == plan.after.layers[0].num_heads and vec["x.hidden"].numel() == 45
