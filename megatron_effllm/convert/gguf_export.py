"""GGUF export for llama.cpp and the other GGML runtimes at the edge.

The file is written with the PyPI ``gguf`` package (``GGUFWriter``), with the metadata and tensor
layout llama.cpp expects:

- Uniform Llama / Mistral models use llama.cpp's ``llama`` architecture, uniform Qwen2 models its
  ``qwen2`` architecture.
- Models whose layers differ in query heads, key/value heads or FFN width use llama.cpp's
  ``deci`` architecture: the Llama block with per-layer arrays for ``attention.head_count``,
  ``attention.head_count_kv`` and ``feed_forward_length``. (llama.cpp reads such arrays for every
  architecture, but only ``deci`` sizes each layer's tensors from them; ``llama`` sizes every
  layer like layer 0.)
- ``llama``/``deci`` apply RoPE to adjacent pairs of each head's dimensions, while Hugging Face
  Llama checkpoints rotate the two halves (``rotate_half``); the rows of ``q_proj``/``k_proj`` are
  reordered per layer, with that layer's head counts, the way llama.cpp's own converter does.
  ``qwen2`` uses the half-split ("NEOX") RoPE of the checkpoint, so nothing is reordered there.
- Norms and biases stay float32; 2-D weights are float32, float16 or Q8_0 (rows whose length is
  not a multiple of the Q8_0 block fall back to float16, as in llama.cpp).

The tokenizer comes either from another GGUF (``tokenizer.*`` keys copied verbatim, e.g. from the
GGUF a model was converted from) or from a Hugging Face tokenizer folder through ``gguf.vocab``.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import torch
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

from megatron_effllm import output_dir
from megatron_effllm.architecture import Architecture
from megatron_effllm.convert.hf_io import load_hf_model, open_gguf
from megatron_effllm.errors import UserError
from megatron_effllm.layout import check_state_dict

GGUF_DTYPES = ("f32", "f16", "q8_0")
# Metadata key that marks a GGUF written here: --overwrite replaces no other file.
EXPORT_KEY = "megatron_effllm.output"


def gguf_arch_name(arch: Architecture) -> str:
    """The llama.cpp architecture a model is written as (see module docstring)."""
    if arch.family == "qwen2":
        if not arch.is_uniform:
            raise UserError(
                "a Qwen2 model with per-layer widths has no llama.cpp architecture (qkv bias with "
                "per-layer heads); export the Hugging Face folder instead, or prune to uniform widths"
            )
        return "qwen2"
    return "llama" if arch.is_uniform else "deci"


def rope_pairs_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (or its bias) from Hugging Face's half-split RoPE
    layout to llama.cpp's adjacent-pair layout: within each head, row ``j`` of the first half and
    row ``j`` of the second half become rows ``2j`` and ``2j + 1``."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(arch: Architecture) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies for Llama-3 RoPE scaling (``rope_freqs.weight``):
    the ratio between the plain RoPE frequencies and the scaled ones transformers uses."""
    s = arch.rope_scaling
    factor = float(s.get("factor", 8.0))
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    dim = arch.head_dim
    freqs = 1.0 / (arch.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_gguf(
    arch: Architecture,
    state_dict: dict[str, torch.Tensor],
    out_file: str,
    *,
    dtype: str = "f16",
    tokenizer_dir: Optional[str] = None,
    tokenizer_gguf: Optional[str] = None,
    name: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Write ``arch`` + canonical ``state_dict`` as a GGUF file; return the architecture name used.

    The tokenizer is copied from ``tokenizer_gguf`` when given, else built from ``tokenizer_dir``
    (a Hugging Face tokenizer folder); one of them is required. Written to a temporary sibling and
    renamed when complete; ``overwrite`` replaces only a GGUF this project exported.
    """
    if dtype not in GGUF_DTYPES:
        raise UserError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    if tokenizer_dir is None and tokenizer_gguf is None:
        raise UserError(
            "a GGUF needs a tokenizer and none was given; pass a Hugging Face tokenizer folder "
            "or a GGUF to copy the tokenizer from (--tokenizer-gguf)"
        )
    sd = check_state_dict(arch, state_dict, "state dict to export")
    arch_name = gguf_arch_name(arch)
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "deci": gguf.MODEL_ARCH.DECI}[
        arch_name
    ]
    with output_dir.write_file(out_file, owned=is_exported_gguf, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        try:
            _add_model_metadata(writer, arch, dtype, name or os.path.splitext(os.path.basename(out_file))[0])
            writer.add_string(EXPORT_KEY, output_dir.MARKER_FORMAT)
            if tokenizer_gguf is not None:
                _copy_tokenizer(writer, tokenizer_gguf, arch.vocab_size)
            else:
                _add_hf_tokenizer(writer, tokenizer_dir, arch.vocab_size)
            names = gguf.get_tensor_name_map(model_arch, arch.num_layers)
            rope_permute = arch_name in ("llama", "deci")
            if arch.rope_scaling and arch.rope_scaling.get("rope_type") == "llama3":
                writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                  llama3_rope_factors(arch))
            for key, tensor in sd.items():
                tensor = tensor.detach().to("cpu", torch.float32)
                if rope_permute and (".self_attn.q_proj." in key or ".self_attn.k_proj." in key):
                    layer = arch.layers[int(key.split(".")[2])]
                    heads = layer.num_heads if ".q_proj." in key else layer.num_kv_groups
                    tensor = rope_pairs_permute(tensor, heads)
                gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:  # check_state_dict admits only canonical names
                    raise RuntimeError(f"no GGUF name for {key}")
                data, raw_dtype = _encode(tensor.numpy(), dtype)
                writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return arch_name


def is_exported_gguf(path: str) -> bool:
    """Whether ``path`` is a GGUF this project exported (it carries ``EXPORT_KEY``)."""
    try:
        return EXPORT_KEY in gguf.GGUFReader(path).fields
    except Exception:  # not a GGUF at all, or a damaged one: not ours to replace
        return False


def export_gguf(
    hf_dir: str,
    out_file: str,
    *,
    dtype: str = "f16",
    tokenizer_gguf: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Export a Hugging Face folder (stock, or a non-uniform export of this project) to GGUF."""
    src = load_hf_model(hf_dir, dtype=torch.float32)
    if src.tokenizer_dir is None and tokenizer_gguf is None:
        raise UserError(
            f"{hf_dir} holds no tokenizer; copy one there or pass --tokenizer-gguf FILE "
            "(a GGUF whose tokenizer the model uses)"
        )
    return write_gguf(
        src.arch, src.state_dict, out_file, dtype=dtype, tokenizer_dir=src.tokenizer_dir,
        tokenizer_gguf=tokenizer_gguf, name=os.path.basename(os.path.normpath(hf_dir)), overwrite=overwrite,
    )


# ---------------------------------------------------------------------------------- metadata
def _add_model_metadata(writer, arch: Architecture, dtype: str, name: str) -> None:
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_block_count(arch.num_layers)
    heads = [l.num_heads for l in arch.layers]
    kv = [l.num_kv_groups for l in arch.layers]
    ffn = [l.ffn_hidden_size for l in arch.layers]
    if arch.is_uniform:
        writer.add_head_count(heads[0])
        writer.add_head_count_kv(kv[0])
        writer.add_feed_forward_length(ffn[0])
    else:
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv)
        writer.add_feed_forward_length(ffn)
    # Explicit: llama.cpp would otherwise derive head_dim as hidden / heads of layer 0.
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_rope_freq_base(float(arch.rope_theta))
    writer.add_layer_norm_rms_eps(float(arch.rms_norm_eps))
    writer.add_vocab_size(arch.vocab_size)
    scaling = arch.rope_scaling
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind != "llama3":  # llama3 travels as the rope_freqs tensor
            raise UserError(
                f"RoPE scaling {kind!r} is not supported by the GGUF export (supported: linear, llama3)"
            )


def _encode(array: np.ndarray, dtype: str):
    """(data, raw ggml type or None) for one tensor in the requested precision."""
    if array.ndim == 1 or dtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if dtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if array.shape[-1] % block == 0:
            return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return np.ascontiguousarray(array, dtype=np.float16), None


# ---------------------------------------------------------------------------------- tokenizer
def _copy_tokenizer(writer, tokenizer_gguf: str, vocab_size: int) -> None:
    reader = open_gguf(tokenizer_gguf)
    copied = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub_type = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
        copied += 1
        if key == "tokenizer.ggml.tokens" and len(field.data) != vocab_size:
            raise UserError(
                f"{tokenizer_gguf} has {len(field.data)} tokens but the model's vocabulary is "
                f"{vocab_size}; pass the GGUF the model was converted from"
            )
    if not copied:
        raise UserError(f"{tokenizer_gguf} has no tokenizer metadata; pass a GGUF that carries one")


def _add_hf_tokenizer(writer, tokenizer_dir: str, vocab_size: int) -> None:
    logging.getLogger("gguf.vocab").setLevel(logging.WARNING)  # per-token info lines
    path = Path(tokenizer_dir)
    vocab = None
    for cls in (BpeVocab, LlamaHfVocab, SentencePieceVocab):
        try:
            vocab = cls(path)
            break
        except (FileNotFoundError, TypeError, ValueError):
            continue
    if vocab is None:
        raise UserError(
            f"{tokenizer_dir}: no tokenizer that GGUF can hold (GPT-2 style BPE tokenizer.json, "
            "Llama BPE with byte fallback, or sentencepiece tokenizer.model); pass --tokenizer-gguf"
        )
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    # Tokens the tokenizer marks special must be CONTROL for llama.cpp to treat them so.
    for token_id, special in _added_tokens(path).items():
        if token_id < len(types) and vocab.tokenizer_model != "llama":
            types[token_id] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    if len(tokens) > vocab_size:
        raise UserError(
            f"{tokenizer_dir}: the tokenizer has {len(tokens)} tokens but the model only {vocab_size} "
            "embeddings; pass the model's own tokenizer"
        )
    for i in range(len(tokens), vocab_size):  # padded embedding rows
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_token_list(tokens)
    if vocab.tokenizer_model != "gpt2":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(path, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(
        writer, quiet=True
    )


def _added_tokens(path: Path) -> dict[int, bool]:
    """{id: special} of the added tokens listed in tokenizer.json (empty if there is none)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return {}
    with open(file, encoding="utf-8") as f:
        added = json.load(f).get("added_tokens") or []
    return {int(t["id"]): bool(t.get("special")) for t in added}
