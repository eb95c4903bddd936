"""megatron-core GPTModel built from an Architecture == the Hugging Face model, in fp32.

TP=1 runs in the test process; TP=2 and PP=2 run on two real gloo ranks (one launch covering
every model at both layouts).
"""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.enums import LayerType

from dist_utils import run_ranks
from megatron_fixtures import ALL_MODELS, CASES, any_model, hf_logits, sample_ids, tiny_hf

TOL = 1e-4


def _megatron_logits(arch, sd, ids, tp, pp):
    from megatron_effllm.model import build_gpt_model, forward_logits, load_canonical
    from megatron_effllm.parallel.runtime import init_model_parallel

    init_model_parallel(tp=tp, pp=pp)
    model = build_gpt_model(arch)
    load_canonical(model, arch, sd)
    return forward_logits(model, ids)


def _compare_families(rank, world_size):
    """On every rank: max |HF - megatron| per model at TP=2, then at PP=2; and per model at TP=2
    (equal?, split weights) of the tensor-parallel attributes of a model built to load weights
    vs one megatron initialised."""
    diffs, attrs = {}, {}
    for tp, pp in ((2, 1), (1, 2)):
        for name in ALL_MODELS:
            hf, arch, sd = any_model(name)
            ids = sample_ids()
            got = _megatron_logits(arch, sd, ids, tp, pp)
            diffs[(name, f"TP={tp} PP={pp}")] = (got - hf_logits(hf, ids)).abs().max().item()
            if tp == 2:  # a model built to load weights marks its split weights as one initialised does
                from megatron_effllm.model import build_gpt_model

                flags = [{n: (getattr(p, "tensor_model_parallel", None), getattr(p, "partition_dim", None))
                          for n, p in build_gpt_model(arch, init_weights=init).named_parameters()}
                         for init in (True, False)]
                attrs[name] = (flags[0] == flags[1], sum(v[0] is True for v in flags[0].values()))
    return diffs, attrs


@pytest.mark.parametrize("family", list(CASES))
def test_tp1_logits_match_hf(family):
    hf, arch, sd = tiny_hf(family)
    ids = sample_ids()
    want = hf_logits(hf, ids)
    got = _megatron_logits(arch, sd, ids, tp=1, pp=1)
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    print(f"{family} TP=1 max abs logit diff {diff:.2e}")
    assert diff <= TOL
    hf.set_attn_implementation("sdpa")
    assert (got - hf_logits(hf, ids)).abs().max().item() <= TOL
    # The comparison can fail: a single swapped KV group changes the logits a lot.
    swapped = dict(sd)
    k = "model.layers.0.self_attn.k_proj.weight"
    half = swapped[k].shape[0] // 2
    swapped[k] = torch.cat([sd[k][half:], sd[k][:half]])
    assert (_megatron_logits(arch, swapped, ids, 1, 1) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_nonuniform_logits_match_hf_io_model(family):
    hf, arch, sd = any_model(f"nonuniform-{family}")
    assert not arch.is_uniform
    ids = sample_ids()
    diff = (_megatron_logits(arch, sd, ids, 1, 1) - hf_logits(hf, ids)).abs().max().item()
    print(f"non-uniform {family} TP=1 max abs logit diff {diff:.2e}")
    assert diff <= TOL


def test_tp2_and_pp2_logits_match_hf():
    """Two real gloo ranks; every model at TP=2, then at PP=2 (llama: 3 layers split 2+1). A model
    built to load weights carries megatron's tensor-parallel attributes (DeepSpeed's clipping
    reads them)."""
    results = run_ranks(_compare_families, world_size=2)
    for rank, (diffs, attrs) in enumerate(results):
        for name, (same, split) in attrs.items():
            assert same and split >= 4, (name, rank, same, split)  # embedding, qkv, proj, fc1, fc2
        for (name, layout), diff in diffs.items():
            print(f"{name} {layout} rank {rank} max abs logit diff {diff:.2e}")
            assert diff <= TOL, (name, layout, rank, diff)


def test_config_errors_are_user_errors():
    from megatron_effllm.errors import UserError
    from megatron_effllm.model import make_transformer_config

    _, arch, _ = tiny_hf("llama")
    config = make_transformer_config(arch, tp=1, pp=2)
    # 3 layers over 2 stages: megatron's layout gets the same split as the converters.
    assert [row.count(LayerType.decoder) for row in
            (r[0] for r in config.pipeline_model_parallel_layout.layout)] == [2, 1]
    assert [config.get_config_for_layer(i).num_attention_heads for i in (1, 2, 3)] == [4, 4, 4]
    with pytest.raises(UserError, match="vocab size 127"):
        make_transformer_config(arch.replace(vocab_size=127), tp=2)
    with pytest.raises(UserError, match="tensor parallel size 4"):
        make_transformer_config(arch, tp=4)
    with pytest.raises(UserError, match="4 pipeline stages"):
        make_transformer_config(arch, pp=4)
    with pytest.raises(UserError, match="RoPE scaling type 'yarn'"):
        make_transformer_config(arch.replace(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


@pytest.mark.parametrize("window", [None, (5, 0)], ids=["causal", "sliding window"])
def test_sdpa_core_attention_equals_megatron_dot_product_attention(window):
    """The local spec's SDPA attention computes what megatron's unfused DotProductAttention does
    (grouped-query heads, causal, sliding window), forward and backward."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_effllm.model import make_transformer_config
    from megatron_effllm.model.attention import SDPAttention
    from megatron_effllm.parallel.runtime import init_model_parallel

    init_model_parallel(tp=1, pp=1)
    _, arch, _ = tiny_hf("llama")
    config = make_transformer_config(arch)
    config.window_size = window
    heads, groups, dim, s, b = config.num_attention_heads, config.num_query_groups, config.kv_channels, 12, 3
    assert heads > groups  # grouped-query attention is exercised
    torch.manual_seed(0)
    q = torch.randn(s, b, heads, dim, requires_grad=True)
    k = torch.randn(s, b, groups, dim, requires_grad=True)
    v = torch.randn(s, b, groups, dim, requires_grad=True)
    outs = []
    for cls in (DotProductAttention, SDPAttention):
        attn = cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        out = attn(q, k, v, attention_mask=None)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v))
        outs.append((out.detach(), grads))
    (want, want_g), (got, got_g) = outs
    assert got.shape == want.shape == (s, b, heads * dim)
    assert (got - want).abs().max().item() < 1e-5
    for g, w in zip(got_g, want_g, strict=True):
        assert (g - w).abs().max().item() < 1e-5
    # The comparison can fail: without the window the sliding-window output differs.
    if window is not None:
        config.window_size = None
        plain = SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        assert (plain(q, k, v, attention_mask=None) - want).abs().max().item() > 1e-3
