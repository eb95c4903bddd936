"""Configuration of a Llama-family decoder whose layers each have their own widths.

A pruned model keeps a different number of query heads, key/value heads and FFN channels in
every layer, which no stock transformers config can describe. These configs extend the stock
Llama / Qwen2 / Mistral configs with one list per width (``*_per_layer``). The scalar fields
(``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``) hold the largest
per-layer value, an upper bound for tools that only read scalars; ``head_dim`` is always
explicit.

This file is copied next to the weights and loaded by
``AutoConfig.from_pretrained(dir, trust_remote_code=True)``; it imports only transformers
(version 5, whose configs are dataclasses) and huggingface_hub.
"""
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, Qwen2Config

# scalar field of the stock config -> list field holding its per-layer values
PER_LAYER_FIELDS = {
    "num_attention_heads": "num_attention_heads_per_layer",
    "num_key_value_heads": "num_key_value_heads_per_layer",
    "intermediate_size": "intermediate_size_per_layer",
}


@dataclass(kw_only=True)
class _PerLayerWidths:
    effllm_family: str = "llama"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None
    # Where each layer sat in the unpruned model (depth pruning removes whole layers).
    source_layer_indices: list[int] | None = None
    num_source_layers: int | None = None

    def layer_widths(self, layer_idx: int) -> dict:
        """The stock config fields that differ for layer ``layer_idx``."""
        return {
            scalar: int(getattr(self, per_layer)[layer_idx])
            for scalar, per_layer in PER_LAYER_FIELDS.items()
        }

    def validate_architecture(self):
        n = self.num_hidden_layers
        for per_layer in PER_LAYER_FIELDS.values():
            values = getattr(self, per_layer)
            if values is None or len(values) != n:
                raise ValueError(f"{per_layer} must list one value for each of the {n} layers")
        for i in range(n):
            widths = self.layer_widths(i)
            heads, kv = widths["num_attention_heads"], widths["num_key_value_heads"]
            if min(widths.values()) < 1 or heads % kv:
                raise ValueError(f"layer {i}: impossible widths {widths}")
        if self.head_dim is None:
            raise ValueError("head_dim must be explicit")


@strict
class EffLLMLlamaConfig(_PerLayerWidths, LlamaConfig):
    model_type = "effllm"


@strict
class EffLLMQwen2Config(_PerLayerWidths, Qwen2Config):
    model_type = "effllm"


@strict
class EffLLMMistralConfig(_PerLayerWidths, MistralConfig):
    model_type = "effllm"


CONFIG_CLASSES = {
    "llama": EffLLMLlamaConfig,
    "qwen2": EffLLMQwen2Config,
    "mistral": EffLLMMistralConfig,
}
