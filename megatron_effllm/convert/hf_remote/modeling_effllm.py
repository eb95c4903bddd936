"""Llama-family causal LM whose decoder layers each have their own widths.

The stock Llama / Qwen2 / Mistral classes do all the work (attention kernels, RoPE, KV cache,
generate()); the only change is that every decoder layer is built from its own number of query
heads, key/value heads and FFN channels, read from the per-layer lists of the config.

This file is copied next to the weights and loaded by
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; it imports only torch and
transformers.
"""
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from .configuration_effllm import EffLLMLlamaConfig, EffLLMMistralConfig, EffLLMQwen2Config


class LayerConfig:
    """The model config as one decoder layer sees it: its own widths, everything else read live
    from the shared config, so later changes (e.g. ``set_attn_implementation``) reach every layer."""

    def __init__(self, config, widths: dict):
        self.__dict__["_config"] = config
        self.__dict__["_widths"] = dict(widths)

    def __getattr__(self, name):
        config = self.__dict__.get("_config")
        if config is None or name.startswith("__"):  # unpickling, copy protocol
            raise AttributeError(name)
        widths = self.__dict__["_widths"]
        return widths[name] if name in widths else getattr(config, name)

    def __repr__(self):
        return f"LayerConfig({self.__dict__['_widths']})"


class _PerLayerWidths:
    """Builds the family's causal LM without decoder layers, then adds each layer at its own widths
    (so no full-width layer is ever allocated)."""

    decoder_layer_class: type

    def __init__(self, config):
        num_layers = config.num_hidden_layers
        config.num_hidden_layers = 0
        try:
            super().__init__(config)
        finally:
            config.num_hidden_layers = num_layers
        self.model.layers = nn.ModuleList(
            self.decoder_layer_class(LayerConfig(config, config.layer_widths(i)), i)
            for i in range(num_layers)
        )
        self.post_init()  # initialise the layers added above


class EffLLMLlamaForCausalLM(_PerLayerWidths, LlamaForCausalLM):
    config_class = EffLLMLlamaConfig
    decoder_layer_class = LlamaDecoderLayer


class EffLLMQwen2ForCausalLM(_PerLayerWidths, Qwen2ForCausalLM):
    config_class = EffLLMQwen2Config
    decoder_layer_class = Qwen2DecoderLayer


class EffLLMMistralForCausalLM(_PerLayerWidths, MistralForCausalLM):
    config_class = EffLLMMistralConfig
    decoder_layer_class = MistralDecoderLayer


MODEL_CLASSES = {
    "llama": EffLLMLlamaForCausalLM,
    "qwen2": EffLLMQwen2ForCausalLM,
    "mistral": EffLLMMistralForCausalLM,
}
