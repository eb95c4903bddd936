"""A functional Llama/Qwen2 forward on the canonical state dict, for any (non-uniform) Architecture.

The pruning tests compare masked and physically pruned models with it; here it is checked
against the stock transformers models on uniform shapes. Also holds the tiny-model builders the
other pruning tests share.
"""
import math
import os

import pytest
import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.layout import canonical_shapes

torch.set_num_threads(1)

HF_IO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_effllm", "convert", "hf_io.py")


def tiny_arch(family="llama", tie=False, heads=6, kv=2, layers=2, hidden=48, head_dim=8, ffn=24, vocab=64):
    return Architecture.uniform(
        family=family, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_groups=kv,
        ffn_hidden_size=ffn, vocab_size=vocab, head_dim=head_dim, tie_word_embeddings=tie,
        qkv_bias=(family == "qwen2"), rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=64,
    )


def random_state_dict(arch, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in canonical_shapes(arch).items():
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.3 * torch.randn(shape, generator=g)).to(dtype)
        elif name.endswith("bias"):
            out[name] = (0.2 * torch.randn(shape, generator=g)).to(dtype)
        else:
            fan_in = shape[-1] if "embed" not in name else 4
            out[name] = (torch.randn(shape, generator=g) / math.sqrt(fan_in)).to(dtype)
    return out


def _rms(x, w, eps, mask=None):
    if mask is None:
        var = x.pow(2).mean(-1, keepdim=True)
    else:
        var = (x.pow(2) * mask).sum(-1, keepdim=True) / mask.sum()
    return w * (x * torch.rsqrt(var + eps))


def _rope(x, theta, d):
    T = x.shape[-2]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(arch, sd, ids, hidden_mask=None):
    """Logits [B, T, vocab]; ``hidden_mask`` makes every RMSNorm use the kept channels' statistics."""
    d, eps = arch.head_dim, arch.rms_norm_eps
    x = sd["model.embed_tokens.weight"][ids]
    B, T = ids.shape
    causal = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)
    for i, s in enumerate(arch.layers):
        p = f"model.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps, hidden_mask)
        proj = lambda n: torch.nn.functional.linear(h, sd[p + f"self_attn.{n}_proj.weight"], sd.get(p + f"self_attn.{n}_proj.bias"))  # noqa: E731
        q = proj("q").view(B, T, s.num_heads, d).transpose(1, 2)
        k = proj("k").view(B, T, s.num_kv_groups, d).transpose(1, 2)
        v = proj("v").view(B, T, s.num_kv_groups, d).transpose(1, 2)
        q, k = _rope(q, arch.rope_theta, d), _rope(k, arch.rope_theta, d)
        rep = s.heads_per_group
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, -1)
        o = (att @ v).transpose(1, 2).reshape(B, T, s.num_heads * d)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps, hidden_mask)
        g = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
        x = x + g @ sd[p + "mlp.down_proj.weight"].T
    x = _rms(x, sd["model.norm.weight"], eps, hidden_mask)
    head = sd["model.embed_tokens.weight"] if arch.tie_word_embeddings else sd["lm_head.weight"]
    return x @ head.T


def hf_config(arch):
    from transformers import LlamaConfig, Qwen2Config

    s = arch.layers[0]
    kw = dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=s.ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_groups,
        head_dim=arch.head_dim, rms_norm_eps=arch.rms_norm_eps, rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_word_embeddings, max_position_embeddings=arch.max_position_embeddings,
        attn_implementation="eager",
    )
    return Qwen2Config(**kw) if arch.family == "qwen2" else LlamaConfig(**kw)


def stock_shape(arch):
    """A stock transformers config describes it (Llama also needs hidden divisible by heads)."""
    return arch.is_uniform and arch.hidden_size % arch.layers[0].num_heads == 0


def hf_model(arch, sd, dtype=torch.float64):
    """A transformers model: stock class for stock shapes, else convert.hf_io.build_hf_model."""
    if stock_shape(arch):
        from transformers import LlamaForCausalLM, Qwen2ForCausalLM

        cls = Qwen2ForCausalLM if arch.family == "qwen2" else LlamaForCausalLM
        model = cls(hf_config(arch)).to(dtype).eval()
        missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
    else:
        if not os.path.exists(HF_IO):
            pytest.skip("non-uniform HF models need megatron_effllm.convert.hf_io.build_hf_model")
        from megatron_effllm.convert import hf_io

        model = hf_io.build_hf_model(arch, {k: v.float() for k, v in sd.items()}).to(dtype).eval()
    if arch.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    return model


def token_batch(arch, batch=2, seq=10, seed=1):
    return torch.randint(0, arch.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,tie", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)])
def test_reference_forward_matches_transformers(family, tie):
    arch = tiny_arch(family, tie)
    sd = random_state_dict(arch)
    ids = token_batch(arch)
    with torch.no_grad():
        want = hf_model(arch, sd)(ids).logits
    got = reference_logits(arch, sd, ids)
    # transformers keeps RMSNorm statistics, RoPE tables and softmax in fp32 even in a fp64 model
    assert (got - want).abs().max() < 1e-5
