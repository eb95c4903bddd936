"""The architecture a run will train, read without loading any weights.

A dry run plans a cluster job on a login node or a laptop: the model folder named in the config
may be elsewhere (a cluster file system). The architecture comes from, in order: ``model.init``
(random-init runs), the builtin SmolLM2, a megatron checkpoint's manifest, the folder's
``config.json``, and else, by the folder's name, the published config of a known model.
"""
from __future__ import annotations

import json
import os

from megatron_effllm.architecture import Architecture
from megatron_effllm.assets import smollm2_hf_dir
from megatron_effllm.convert import megatron_checkpoint as megatron_ckpt
from megatron_effllm.errors import UserError
from megatron_effllm.training.source import BUILTIN_MODELS

# config.json fields of published models (Hugging Face model cards), for sources not reachable
# here; keyed by the folder name a config's model.source ends in.
KNOWN_MODELS = {
    "Qwen2.5-1.5B": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=131072),
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def _from_config_json(path: str) -> Architecture:
    try:
        with open(path) as f:
            return Architecture.from_hf_config(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a readable model config ({err}); repair the model folder") from None


def plan_architecture(model_cfg) -> tuple[Architecture, str]:
    """(Architecture, where it was read) for a config's ``model`` section."""
    source = model_cfg.source
    if not source:
        init = model_cfg.init or {}
        if set(init) == {"architecture"}:
            return Architecture.load(str(init["architecture"])), f"model.init.architecture {init['architecture']}"
        try:
            return Architecture.uniform(**init), "model.init"
        except TypeError as err:
            raise UserError(f"model.init: {err}; give Architecture.uniform fields") from None
    if source in BUILTIN_MODELS:
        return _from_config_json(os.path.join(smollm2_hf_dir(dtype="float32"), "config.json")), source
    if os.path.isfile(os.path.join(source, megatron_ckpt.MANIFEST)):
        return megatron_ckpt.read_checkpoint_info(source)[0], f"megatron checkpoint {source}"
    if os.path.isfile(os.path.join(source, "config.json")):
        return _from_config_json(os.path.join(source, "config.json")), f"{source}/config.json"
    name = os.path.basename(os.path.normpath(source))
    if name in KNOWN_MODELS:
        return Architecture.from_hf_config(KNOWN_MODELS[name]), f"published config of {name} ({source} not found here)"
    raise UserError(f"model.source {source} has no config.json here and is not a known model "
                    f"({', '.join(sorted(KNOWN_MODELS))}); run the dry run where the model folder is")
