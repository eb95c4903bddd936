"""The canonical state dict: Hugging Face Llama names, one table for every part of the system.

Every converter, the model builder's weight loader, the pruner and the exporters speak this
dict (Llama / Qwen2 / Mistral share it; Qwen2 adds the q/k/v biases)::

    model.embed_tokens.weight                      [vocab, hidden]
    model.layers.{i}.input_layernorm.weight        [hidden]
    model.layers.{i}.self_attn.{q,k,v}_proj.weight [heads*d | kv*d | kv*d, hidden]  (+ .bias: qkv_bias)
    model.layers.{i}.self_attn.o_proj.weight       [hidden, heads*d]
    model.layers.{i}.post_attention_layernorm.weight [hidden]
    model.layers.{i}.mlp.{gate,up}_proj.weight     [ffn, hidden]
    model.layers.{i}.mlp.down_proj.weight          [hidden, ffn]
    model.norm.weight                              [hidden]
    lm_head.weight                                 [vocab, hidden]  (absent when tied)

``TENSORS`` writes each dimension symbolically; the symbols other than ``vocab`` are also the
prunable group kinds that index the dimension (``pruning.groups.tensor_axes`` is derived from
them). ``i`` is the position in ``arch.layers`` (pruned layers are dropped and renumbered).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError

# Symbolic dimensions. All but VOCAB are group kinds of pruning.groups (one head = head_dim rows).
VOCAB, HIDDEN, HEAD, KV, FFN = "vocab", "hidden", "head", "kv", "ffn"
# Optional tensors: present only when the architecture says so.
QKV_BIAS, UNTIED = "qkv_bias", "untied"
LAYERS = "model.layers."


@dataclass(frozen=True)
class CanonicalTensor:
    """One canonical tensor: its name (relative to ``model.layers.{i}.`` when ``per_layer``),
    one symbol per dimension, and the condition for its presence (None: always)."""

    name: str
    dims: tuple[str, ...]
    per_layer: bool = False
    when: Optional[str] = None

    def present(self, arch: Architecture) -> bool:
        if self.when == QKV_BIAS:
            return arch.qkv_bias
        if self.when == UNTIED:
            return not arch.tie_word_embeddings
        return True


def _layer(name: str, dims: tuple[str, ...], when: Optional[str] = None) -> CanonicalTensor:
    return CanonicalTensor(name, dims, per_layer=True, when=when)


# In checkpoint order: the embedding, every layer's tensors, the final norm and the lm_head.
TENSORS = (
    CanonicalTensor("model.embed_tokens.weight", (VOCAB, HIDDEN)),
    _layer("input_layernorm.weight", (HIDDEN,)),
    _layer("self_attn.q_proj.weight", (HEAD, HIDDEN)),
    _layer("self_attn.q_proj.bias", (HEAD,), QKV_BIAS),
    _layer("self_attn.k_proj.weight", (KV, HIDDEN)),
    _layer("self_attn.k_proj.bias", (KV,), QKV_BIAS),
    _layer("self_attn.v_proj.weight", (KV, HIDDEN)),
    _layer("self_attn.v_proj.bias", (KV,), QKV_BIAS),
    _layer("self_attn.o_proj.weight", (HIDDEN, HEAD)),
    _layer("post_attention_layernorm.weight", (HIDDEN,)),
    _layer("mlp.gate_proj.weight", (FFN, HIDDEN)),
    _layer("mlp.up_proj.weight", (FFN, HIDDEN)),
    _layer("mlp.down_proj.weight", (HIDDEN, FFN)),
    CanonicalTensor("model.norm.weight", (HIDDEN,)),
    CanonicalTensor("lm_head.weight", (VOCAB, HIDDEN), when=UNTIED),
)


def layer_prefix(pos: int) -> str:
    return f"{LAYERS}{pos}."


def layer_of(name: str) -> Optional[int]:
    """Layer position of a canonical tensor name, or None for embeddings / final norm / lm_head."""
    if name.startswith(LAYERS):
        return int(name.split(".")[2])
    return None


def renumber(name: str, new_pos: Mapping[int, int]) -> str:
    """``name`` with its layer position ``l`` replaced by ``new_pos[l]`` (others unchanged)."""
    l = layer_of(name)
    return name if l is None else layer_prefix(new_pos[l]) + name[len(layer_prefix(l)):]


def dim_size(arch: Architecture, dim: str, layer: Optional[int] = None) -> int:
    """Size of symbolic dimension ``dim`` (in layer position ``layer`` for per-layer symbols)."""
    if dim == VOCAB:
        return arch.vocab_size
    if dim == HIDDEN:
        return arch.hidden_size
    shape = arch.layers[layer]
    if dim == HEAD:
        return shape.num_heads * arch.head_dim
    if dim == KV:
        return shape.num_kv_groups * arch.head_dim
    if dim == FFN:
        return shape.ffn_hidden_size
    raise ValueError(f"unknown canonical dimension {dim!r}")


_BY_NAME = {t.name: t for t in TENSORS}


def tensor_shape(arch: Architecture, name: str) -> Optional[tuple[int, ...]]:
    """Shape of canonical tensor ``name`` of ``arch``, or None if ``arch`` has no such tensor."""
    l = layer_of(name)
    spec = _BY_NAME.get(name if l is None else name[len(layer_prefix(l)):])
    if spec is None or spec.per_layer != (l is not None) or not spec.present(arch):
        return None
    if l is not None and not 0 <= l < arch.num_layers:
        return None
    return tuple(dim_size(arch, d, l) for d in spec.dims)


def iter_tensors(arch: Architecture) -> Iterator[tuple[str, tuple[str, ...], Optional[int]]]:
    """(full name, dimension symbols, layer position or None) of every canonical tensor of
    ``arch``, in checkpoint order."""
    layer_rows = [t for t in TENSORS if t.per_layer and t.present(arch)]
    top = [t for t in TENSORS if not t.per_layer and t.present(arch)]
    yield top[0].name, top[0].dims, None  # the embedding
    for i in range(arch.num_layers):
        for t in layer_rows:
            yield layer_prefix(i) + t.name, t.dims, i
    for t in top[1:]:
        yield t.name, t.dims, None


def canonical_shapes(arch: Architecture) -> "OrderedDict[str, tuple[int, ...]]":
    """Name -> shape of every tensor of the canonical state dict, in checkpoint order."""
    return OrderedDict(
        (name, tuple(dim_size(arch, d, layer) for d in dims)) for name, dims, layer in iter_tensors(arch)
    )


def check_state_dict(
    arch: Architecture, tensors: Mapping[str, torch.Tensor], what: str = "state dict"
) -> "OrderedDict[str, torch.Tensor]":
    """``tensors`` as the canonical state dict of ``arch`` (canonical order), or a UserError
    naming the first missing, unexpected or mis-shaped weight; ``what`` names the source.

    Tolerated and dropped: ``lm_head.weight`` of a tied model (some checkpoints store the copy)
    and the RoPE ``inv_freq`` buffers old checkpoints carry.
    """
    expected = canonical_shapes(arch)
    present = {
        k: v for k, v in tensors.items()
        if not k.endswith("rotary_emb.inv_freq")
        and not (k == "lm_head.weight" and arch.tie_word_embeddings)
    }
    missing = [k for k in expected if k not in present]
    if missing:
        raise UserError(
            f"{what}: weight {missing[0]} is missing ({len(missing)} missing in all); the weights "
            "do not match the config: re-export the model or fix its config"
        )
    unexpected = [k for k in present if k not in expected]
    if unexpected:
        raise UserError(
            f"{what}: unexpected weight {unexpected[0]} ({len(unexpected)} unexpected in all); only "
            "Llama-family decoders without MLP/output biases are supported, or the config "
            "describes a different model"
        )
    for name, shape in expected.items():
        if tuple(present[name].shape) != shape:
            raise UserError(
                f"{what}: weight {name} has shape {tuple(present[name].shape)} but the config "
                f"implies {shape}; the config does not match the weights (re-export the model)"
            )
    return OrderedDict((k, present[k]) for k in expected)
