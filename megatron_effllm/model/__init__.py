"""megatron-core GPT models built from an ``Architecture`` (per-layer widths)."""
from megatron_effllm.model.builder import (
    PerLayerTransformerConfig,
    build_gpt_model,
    make_transformer_config,
    te_available,
)
from megatron_effllm.model.forward import forward_logits, greedy_generate
from megatron_effllm.model.weights import (
    gather_canonical,
    gather_shards,
    load_canonical,
    load_local,
    local_state_dict,
)

__all__ = [
    "PerLayerTransformerConfig",
    "build_gpt_model",
    "make_transformer_config",
    "te_available",
    "forward_logits",
    "greedy_generate",
    "gather_canonical",
    "gather_shards",
    "load_canonical",
    "load_local",
    "local_state_dict",
]
