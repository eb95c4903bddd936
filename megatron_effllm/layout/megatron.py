"""The canonical state dict <-> megatron-core GPTModel state dicts, derived from one table.

``PARAMS`` lists every megatron tensor once: its name (local spec; the TransformerEngine spec
name where it differs), the canonical tensor(s) it holds and its ``Kind`` (``layout.kinds``:
replicated, vocab-parallel, row-parallel, fused qkv, fused gate/up). All four directions are
derived from it:

- canonical -> a shard: ``to_megatron`` (a whole state dict), ``iter_megatron`` (one tensor at
  a time, asking for each canonical tensor when needed), ``megatron_tensor`` (one tensor);
- shards -> canonical: ``from_megatron`` (every shard), ``canonical_from_shards`` (one tensor
  from every TP rank's copy);
- one shard's tensor -> the parts of canonical tensors it holds: ``canonical_pieces``.

No process group is needed: every (tensor-parallel rank, pipeline stage) shard, given as a
``ParallelDims``, can be built or read in one process. Any tensor shaped like the weight
(gradients, Adam moments, 0/1 masks) maps the same way.

Megatron's layout: ``self_attention.linear_qkv`` interleaves q/k/v rows per KV group and each
TP rank holds whole KV groups; ``mlp.linear_fc1`` is ``[gate_shard; up_shard]`` on every TP
rank; ``linear_proj``/``linear_fc2`` are split by columns, the embedding and output layer by
vocab rows, norms are replicated. The first pipeline stage holds the embedding, the last the
final norm and the output layer; layers sit in contiguous ranges (``layout.pipeline``),
numbered locally from 0 in each stage's state dict. With tied embeddings the last stage of a
multi-stage pipeline holds its own ``output_layer.weight`` copy of the embedding, as megatron
does; a single stage shares the embedding and has no output layer tensor.

Two naming styles exist: the local spec (separate ``input_layernorm``/``pre_mlp_layernorm``)
and TransformerEngine's (norms fused into ``linear_qkv.layer_norm_weight`` and
``linear_fc1.layer_norm_weight``). ``_extra_state`` keys are ignored on read and never
produced on write (the model keeps its defaults).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm.errors import UserError
from megatron_effllm.layout.canonical import QKV_BIAS, check_state_dict, layer_prefix, tensor_shape
from megatron_effllm.layout.dims import ParallelDims
from megatron_effllm.layout.kinds import FUSED_GATE_UP, FUSED_QKV, REPLICATED, ROW, VOCAB, Kind
from megatron_effllm.layout.pipeline import stage_layers

LOCAL = "local"
TE = "te"
# Where a tensor sits: the first stage, every layer, the last stage.
FIRST, EACH_LAYER, LAST = "first", "layer", "last"
# A tied model's output layer is megatron's copy of the embedding, held apart only when the
# last stage is not also the first.
OWN_OUTPUT = "own_output"
LAYERS = "decoder.layers."
LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"

Tensor = torch.Tensor


@dataclass(frozen=True)
class Param:
    """One megatron tensor: name (relative to ``decoder.layers.N.`` in a layer), the canonical
    tensors it holds (relative to ``model.layers.i.`` in a layer), how, where, and when."""

    name: str
    canonical: tuple[str, ...]
    kind: Kind
    where: str = EACH_LAYER
    te_name: Optional[str] = None
    when: Optional[str] = None

    def named(self, style: str) -> str:
        return self.te_name if style == TE and self.te_name else self.name

    def present(self, arch: Architecture, dims: ParallelDims) -> bool:
        if self.when == QKV_BIAS:
            return arch.qkv_bias
        if self.when == OWN_OUTPUT:
            return not arch.tie_word_embeddings or not dims.first_stage
        return True


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

PARAMS = (
    Param("embedding.word_embeddings.weight", (EMBEDDING,), VOCAB, FIRST),
    Param("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED,
          te_name="self_attention.linear_qkv.layer_norm_weight"),
    Param("self_attention.linear_qkv.weight", tuple(f"{p}.weight" for p in _QKV), FUSED_QKV),
    Param("self_attention.linear_qkv.bias", tuple(f"{p}.bias" for p in _QKV), FUSED_QKV, when=QKV_BIAS),
    Param("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ROW),
    Param("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED,
          te_name="mlp.linear_fc1.layer_norm_weight"),
    Param("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), FUSED_GATE_UP),
    Param("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW),
    Param("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, LAST),
    Param("output_layer.weight", (LM_HEAD,), VOCAB, LAST, when=OWN_OUTPUT),
)
_LAYER_NAMES = {n: p for p in PARAMS if p.where == EACH_LAYER for n in (p.name, p.te_name) if n}
_TOP_NAMES = {p.name: p for p in PARAMS if p.where != EACH_LAYER}


@dataclass(frozen=True)
class Entry:
    """A table row bound to one shard: the full megatron name (stage-local layer number), the
    full canonical names, the kind, and the layer's shape (None outside the layers)."""

    name: str
    canonical: tuple[str, ...]
    kind: Kind
    layer: Optional[LayerShape]


def _bind(arch: Architecture, p: Param, name: str, pos: Optional[int]) -> Entry:
    if pos is not None:
        return Entry(name, tuple(layer_prefix(pos) + c for c in p.canonical), p.kind, arch.layers[pos])
    canon = tuple(EMBEDDING if c == LM_HEAD and arch.tie_word_embeddings else c for c in p.canonical)
    return Entry(name, canon, p.kind, None)


def shard_entries(arch: Architecture, dims: ParallelDims = ParallelDims(), style: str = LOCAL) -> Iterator[Entry]:
    """Every megatron tensor of shard ``dims`` (its TP rank and pipeline stage), in model order."""
    if style not in (LOCAL, TE):
        raise ValueError(f"unknown megatron naming style {style!r}")
    stage = [p for p in PARAMS if p.present(arch, dims)]
    if dims.first_stage:
        yield from (_bind(arch, p, p.name, None) for p in stage if p.where == FIRST)
    for local, i in enumerate(stage_layers(arch.num_layers, dims.pp, dims.pp_rank)):
        for p in stage:
            if p.where == EACH_LAYER:
                yield _bind(arch, p, f"{LAYERS}{local}.{p.named(style)}", i)
    if dims.last_stage:
        yield from (_bind(arch, p, p.name, None) for p in stage if p.where == LAST)


def entry(arch: Architecture, name: str, dims: ParallelDims = ParallelDims()) -> Optional[Entry]:
    """The entry of megatron tensor ``name`` of shard ``dims`` (either naming style); None for
    ``_extra_state`` keys, a UserError for a name the table does not know."""
    if is_extra_state(name):
        return None
    if not name.startswith(LAYERS):
        if name not in _TOP_NAMES:
            raise UserError(f"no canonical tensor corresponds to megatron tensor {name}")
        return _bind(arch, _TOP_NAMES[name], name, None)
    parts = name.split(".")
    local, rest = int(parts[2]), ".".join(parts[3:])
    held = stage_layers(arch.num_layers, dims.pp, dims.pp_rank)
    if local >= len(held):
        raise UserError(
            f"{name}: pipeline stage {dims.pp_rank} of {dims.pp} holds only {len(held)} layers; "
            "the tensors were made for another architecture or layout"
        )
    if rest not in _LAYER_NAMES:
        raise UserError(f"no canonical tensor corresponds to megatron tensor decoder.layers.N.{rest}")
    return _bind(arch, _LAYER_NAMES[rest], name, held[local])


def detect_style(megatron_keys: Iterable[str]) -> str:
    """LOCAL or TE, from the keys of a megatron state dict."""
    return TE if any(k.endswith("linear_qkv.layer_norm_weight") for k in megatron_keys) else LOCAL


def is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


# ----------------------------------------------------------------------------- canonical -> shard
def to_megatron(
    arch: Architecture, sd: Mapping[str, Tensor], dims: ParallelDims = ParallelDims(), style: str = LOCAL
) -> dict[str, Tensor]:
    """The megatron state dict of shard ``dims`` (TP rank, pipeline stage) from a canonical
    state dict; layer keys are numbered locally in the stage."""
    sd = check_state_dict(arch, sd, "canonical state dict")
    arch.validate(tensor_parallel=dims.tp)
    if arch.vocab_size % dims.tp:
        raise UserError(
            f"vocab size {arch.vocab_size} is not divisible by tensor parallel size {dims.tp}; "
            "choose a TP size that divides the vocabulary"
        )
    return dict(iter_megatron(arch, sd.__getitem__, dims, style))


def iter_megatron(
    arch: Architecture, get: Callable[[str], Tensor], dims: ParallelDims = ParallelDims(), style: str = LOCAL
) -> Iterator[tuple[str, Tensor]]:
    """``to_megatron`` one megatron tensor at a time, asking ``get`` for each canonical tensor
    when it is needed: a caller that makes canonical tensors on demand (the pruning masks)
    holds at most one megatron tensor's of them, never the whole model's."""
    for e in shard_entries(arch, dims, style):
        yield e.name, e.kind.shard([get(c) for c in e.canonical], e.layer, dims)


def megatron_tensor(
    arch: Architecture, name: str, canon: Mapping[str, Tensor], dims: ParallelDims = ParallelDims()
) -> Tensor:
    """Shard ``dims.tp_rank`` of megatron tensor ``name`` (layer numbers local to stage
    ``dims.pp_rank``) from the full canonical tensors it holds parts of
    (``canonical_from_shards``' output, or a canonical state dict): the one-tensor inverse of
    ``canonical_pieces``."""
    e = entry(arch, name, dims)
    if e is None:
        raise UserError(f"no canonical tensor corresponds to megatron tensor {name}")
    missing = [c for c in e.canonical if c not in canon]
    if missing:
        raise UserError(f"megatron tensor {name} needs canonical tensor {missing[0]}, which is missing")
    return e.kind.shard([canon[c] for c in e.canonical], e.layer, dims)


def megatron_shapes(
    arch: Architecture, dims: ParallelDims = ParallelDims(), style: str = LOCAL
) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every megatron tensor of shard ``dims``, without any data (the kinds'
    math run on meta tensors)."""
    def get(name: str) -> Tensor:
        return torch.empty(tensor_shape(arch, name), device="meta")

    return {name: tuple(t.shape) for name, t in iter_megatron(arch, get, dims, style)}


def all_shards(
    arch: Architecture, sd: Mapping[str, Tensor], tp: int = 1, pp: int = 1, style: str = LOCAL
) -> Dict[tuple[int, int], dict[str, Tensor]]:
    """Every shard ``{(tp_rank, pp_rank): state dict}`` of a tp x pp layout."""
    return {
        (t, p): to_megatron(arch, sd, ParallelDims(t, tp, p, pp), style)
        for p in range(pp)
        for t in range(tp)
    }


# ----------------------------------------------------------------------------- shard -> canonical
def canonical_pieces(
    arch: Architecture, name: str, t: Tensor, dims: ParallelDims = ParallelDims(), check: bool = True
) -> dict[str, tuple[Tensor, dict[int, int]]]:
    """The parts of canonical tensors that megatron tensor ``name`` of shard ``dims`` holds:
    ``{canonical name: (piece, {dim: start})}``.

    ``t`` may be the weight or anything shaped like it (a gradient, an Adam moment, a mask);
    pieces are views of ``t``, except the q/k/v pieces of ``linear_qkv`` (copies).
    ``{dim: start}`` has one entry per dimension that tensor parallelism splits (where this
    rank's piece starts in the canonical tensor), so an empty dict means the tensor is
    replicated on every TP rank (norms). A stage's local layer numbers become global layer
    positions. With tied embeddings the last stage's ``output_layer.weight`` (megatron's copy
    of the embedding) maps to the embedding. ``_extra_state`` keys give nothing.
    ``check=False`` skips the shape check against the architecture (for hot paths that feed
    tensors of a model built from it).
    """
    e = entry(arch, name, dims)
    if e is None:
        return {}
    pieces = {}
    for canon, piece in zip(e.canonical, e.kind.unshard(t, e.layer, dims.tp)):
        full = tensor_shape(arch, canon)
        want = None if full is None else tuple(n // dims.tp if d in e.kind.split else n for d, n in enumerate(full))
        if want is None or (check and tuple(piece.shape) != want):
            raise UserError(
                f"megatron tensor {name} gives {canon} a piece of shape {tuple(piece.shape)}, the "
                f"architecture at tensor parallel size {dims.tp} needs {want}; the tensors were made "
                "for another architecture or layout"
            )
        pieces[canon] = (piece, {d: dims.tp_rank * want[d] for d in e.kind.split})
    return pieces


def canonical_from_shards(
    arch: Architecture, name: str, shards: Sequence[Tensor], pp_rank: int = 0, pp: int = 1
) -> dict[str, Tensor]:
    """The full canonical tensors that megatron tensor ``name`` holds parts of, from every TP
    rank's copy of it (``shards`` in TP rank order, all of pipeline stage ``pp_rank``).

    Works on anything shaped like the weight (fp32 masters, Adam moments); pure data movement,
    so a round trip through ``megatron_tensor`` is exact. Replicated tensors (norms) are
    taken from TP rank 0. One megatron tensor at a time: the transient is one full tensor.
    """
    tp = len(shards)
    out: dict[str, Tensor] = {}
    for tp_rank, t in enumerate(shards):
        pieces = canonical_pieces(arch, name, t, ParallelDims(tp_rank, tp, pp_rank, pp))
        for canon, (piece, offsets) in pieces.items():
            if not offsets:
                if tp_rank == 0:
                    out[canon] = piece.clone()
                continue
            if canon not in out:
                out[canon] = torch.empty(tensor_shape(arch, canon), dtype=piece.dtype, device=piece.device)
            index = [slice(None)] * piece.dim()
            for d, start in offsets.items():
                index[d] = slice(start, start + piece.shape[d])
            out[canon][tuple(index)] = piece
    return out


def from_megatron(
    arch: Architecture, shards: Mapping[tuple[int, int], Mapping[str, Tensor]], tp: int, pp: int
) -> dict[str, Tensor]:
    """The canonical state dict from every shard of a tp x pp layout, keyed ``(tp_rank, pp_rank)``.

    ``_extra_state`` keys are ignored; the naming style is detected from the keys. With tied
    embeddings the embedding is read from the first stage (the last stage's copy is skipped).
    """
    for t in range(tp):
        for p in range(pp):
            if (t, p) not in shards:
                raise UserError(f"megatron shard tp={t} pp={p} is missing (expected {tp}x{pp} shards)")
    style = detect_style(shards[(0, 0)].keys())

    def get(t: int, p: int, key: str) -> Tensor:
        try:
            return shards[(t, p)][key]
        except KeyError:
            raise UserError(
                f"megatron shard tp={t} pp={p} has no tensor {key}; the checkpoint does not "
                "match its architecture"
            ) from None

    out: dict[str, Tensor] = {}
    for p in range(pp):
        for e in shard_entries(arch, ParallelDims(0, tp, p, pp), style):
            if all(c in out for c in e.canonical):
                continue
            out.update(canonical_from_shards(arch, e.name, [get(t, p, e.name) for t in range(tp)], p, pp))
    return check_state_dict(arch, out, "canonical state dict")
