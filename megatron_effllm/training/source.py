"""Where a run's model comes from: a Hugging Face folder or ``.gguf``, a megatron checkpoint
folder (effllm-convert-megatron), the builtin SmolLM2, or a random initialisation."""
from __future__ import annotations

import os

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.assets import smollm2_hf_dir
from megatron_effllm.convert import megatron_checkpoint as megatron_ckpt
from megatron_effllm.convert.hf_io import load_hf_model
from megatron_effllm.errors import UserError
from megatron_effllm.model.builder import build_gpt_model
from megatron_effllm.model.weights import gather_canonical, random_canonical

BUILTIN_MODELS = ("smollm2-135m",)


def resolve_source(source: str) -> str:
    if source in BUILTIN_MODELS:
        return smollm2_hf_dir(dtype="float32")
    return source


def load_source(cfg) -> tuple:
    """(Architecture, canonical state dict, tokenizer path) of ``cfg.model``; collective when
    the source is a megatron checkpoint (it loads at the run's TP/PP)."""
    m = cfg.model
    if m.source:
        path = resolve_source(m.source)
        if os.path.isfile(os.path.join(path, megatron_ckpt.MANIFEST)):
            return _megatron_source(path, m.tokenizer)
        src = load_hf_model(path)
        return src.arch, src.state_dict, src.tokenizer_dir
    try:
        if set(m.init) == {"architecture"}:  # any shape, e.g. a pruned run's final/architecture.json
            if not os.path.isfile(str(m.init["architecture"])):
                raise UserError(f"model.init.architecture {m.init['architecture']} not found; give an "
                                "architecture.json (a run's final/architecture.json)")
            arch = Architecture.load(m.init["architecture"])
        else:
            arch = Architecture.uniform(**m.init)
    except TypeError as err:
        raise UserError(f"model.init: {err}; give Architecture.uniform fields "
                        "(num_layers, hidden_size, num_heads, num_kv_groups, ffn_hidden_size, vocab_size, ...)") from None
    if not m.tokenizer:
        raise UserError("model.init needs model.tokenizer (HF folder, .gguf, .model or smollm2-135m)")
    return arch, random_canonical(arch, cfg.seed), m.tokenizer  # the same at any TP/PP


def _megatron_source(path: str, tokenizer: str) -> tuple:
    """The checkpoint's weights loaded into a model at the current TP/PP (they load at any
    layout), gathered to the canonical state dict; its tokenizer/ folder, else ``tokenizer``."""
    arch, _ = megatron_ckpt.read_checkpoint_info(path)
    model = build_gpt_model(arch, params_dtype=torch.float32, init_weights=False)
    megatron_ckpt.load_into_model(model, path, arch)
    canonical = gather_canonical(model, arch)
    tok = os.path.join(path, megatron_ckpt.TOKENIZER_DIR)
    if not os.path.isdir(tok):
        if not tokenizer:
            raise UserError(f"megatron checkpoint {path} has no tokenizer/ folder; set model.tokenizer "
                            "to the tokenizer it was trained with")
        tok = tokenizer
    return arch, canonical, tok
