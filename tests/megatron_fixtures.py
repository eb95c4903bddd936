"""Tiny random Hugging Face models (Llama, Qwen2, Mistral) for the megatron model/convert tests.

Weights are drawn with a larger spread than HF's 0.02 initialisation so that logits differ
clearly between tokens and any layout mistake shows up as a large error.
"""
from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from megatron_effllm.architecture import Architecture
from megatron_effllm.layout import canonical_shapes

VOCAB = 128

# family -> (config class, model class, config kwargs). Each covers a different corner:
# llama: 3 layers (uneven PP split), untied, llama3 RoPE scaling with a short original context;
# qwen2: qkv bias, tied embeddings, large rope_theta; mistral: head_dim != hidden/heads, untied.
CASES = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, tie_word_embeddings=True, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=64, tie_word_embeddings=False, sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.15 * noise)


def tiny_hf(family: str, seed: int = 0):
    """(HF model in fp32 eval mode with eager attention, Architecture, canonical state dict)."""
    config_cls, model_cls, kwargs = CASES[family]
    config = config_cls(vocab_size=VOCAB, max_position_embeddings=256, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_(model, seed)
    arch = Architecture.from_hf_config(config.to_dict())
    return model, arch, canonical_from_hf(model, arch)


def canonical_from_hf(model: torch.nn.Module, arch: Architecture) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in canonical_shapes(arch)}


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def sample_ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def random_canonical(arch: Architecture, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random canonical state dict for ``arch`` (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in canonical_shapes(arch).items():
        noise = torch.randn(shape, generator=g)
        if name.endswith("norm.weight"):
            sd[name] = 1.0 + 0.2 * noise
        elif name.endswith(".bias"):
            sd[name] = 0.3 * noise
        else:
            sd[name] = 0.15 * noise
    return sd


def nonuniform_arch(family: str) -> Architecture:
    """Every layer with its own query heads, KV groups and FFN width (all even, for TP=2)."""
    from megatron_effllm.architecture import LayerShape

    widths = [(4, 2, 48), (2, 2, 32), (8, 2, 64)]
    return Architecture(
        family=family,
        hidden_size=32,
        head_dim=8,
        vocab_size=VOCAB,
        layers=tuple(LayerShape(h, kv, f, i) for i, (h, kv, f) in enumerate(widths)),
        num_source_layers=3,
        tie_word_embeddings=family == "qwen2",
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        qkv_bias=family == "qwen2",
        max_position_embeddings=256,
    )


def nonuniform_hf(family: str, seed: int = 0):
    """(HF model from hf_io.build_hf_model, Architecture, canonical state dict)."""
    from megatron_effllm.convert.hf_io import build_hf_model

    arch = nonuniform_arch(family)
    sd = random_canonical(arch, seed)
    return build_hf_model(arch, sd, attn_implementation="eager"), arch, sd


def any_model(name: str):
    """A fixture by name: a CASES family, or 'nonuniform-<family>'."""
    if name.startswith("nonuniform-"):
        return nonuniform_hf(name.split("-", 1)[1])
    return tiny_hf(name)


ALL_MODELS = list(CASES) + ["nonuniform-llama", "nonuniform-qwen2"]
