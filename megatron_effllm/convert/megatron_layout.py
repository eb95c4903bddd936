"""Canonical (HF Llama names) state dict <-> megatron-core GPTModel state dicts, as tensor math.

No process group is needed: every (tensor-parallel rank, pipeline stage) shard can be built or
read in one process. The per-layer primitives (``qkv_to_megatron``, ``fc1_to_megatron`` and
their inverses, ``column_shard``/``row_shard``) work on any tensor shaped like the weight they
describe, so gradients, Adam moments and 0/1 masks map the same way.

Megatron's layout, per layer (``[q heads of group g..., k_g, v_g]`` for each KV group g):

- ``self_attention.linear_qkv.weight`` rows = per-group interleaving of q/k/v rows (bias alike);
  under TP each rank holds a contiguous block of whole KV groups;
- ``mlp.linear_fc1.weight`` = ``[gate_shard; up_shard]`` on every TP rank (the full tensor at
  TP=1 is ``[gate; up]``);
- ``linear_proj``/``linear_fc2`` are split by columns, embedding/output layer by vocab rows,
  norms are replicated;
- pipeline stages hold contiguous layer ranges (``stage_layer_counts``), numbered locally
  from 0 in each stage's state dict.

Two naming styles exist: the local spec (separate ``input_layernorm``/``pre_mlp_layernorm``)
and TransformerEngine's (norms fused into ``linear_qkv.layer_norm_weight`` and
``linear_fc1.layer_norm_weight``). ``_extra_state`` keys are ignored on read and never
produced on write (the model keeps its defaults).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, Mapping, Sequence

import torch

from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm.convert.hf_io import canonical_shapes, check_state_dict
from megatron_effllm.errors import UserError

LOCAL = "local"
TE = "te"

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- pipeline placement
def stage_layer_counts(num_layers: int, pp_size: int) -> list[int]:
    """Layers per pipeline stage: as even as possible, the first stages take the remainder
    (the last stage also carries the output layer and the loss)."""
    if pp_size < 1:
        raise UserError(f"pipeline parallel size must be >= 1, got {pp_size}")
    if num_layers < pp_size:
        raise UserError(
            f"{num_layers} layers cannot fill {pp_size} pipeline stages; "
            "use a pipeline parallel size <= the number of layers"
        )
    base, extra = divmod(num_layers, pp_size)
    return [base + (1 if s < extra else 0) for s in range(pp_size)]


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global layer indices held by pipeline stage ``pp_rank``."""
    counts = stage_layer_counts(num_layers, pp_size)
    if not 0 <= pp_rank < pp_size:
        raise UserError(f"pipeline rank {pp_rank} out of range for {pp_size} stages")
    start = sum(counts[:pp_rank])
    return range(start, start + counts[pp_rank])


# ----------------------------------------------------------------------------- per-tensor primitives
def column_shard(t: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """Rows (output features) of ``t`` held by ``tp_rank``."""
    if t.shape[0] % tp_size:
        raise UserError(
            f"dimension {t.shape[0]} is not divisible by tensor parallel size {tp_size}"
        )
    return t.chunk(tp_size, dim=0)[tp_rank].clone()


def row_shard(t: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """Columns (input features) of ``t`` held by ``tp_rank``."""
    if t.shape[1] % tp_size:
        raise UserError(
            f"dimension {t.shape[1]} is not divisible by tensor parallel size {tp_size}"
        )
    return t.chunk(tp_size, dim=1)[tp_rank].clone()


def merge_columns(shards: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(shards), dim=0)


def merge_rows(shards: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(shards), dim=1)


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_groups: int) -> Tensor:
    """Full (TP=1) ``linear_qkv`` from q/k/v; dim 0 is the head-row dimension, the rest
    (hidden columns, or nothing for a bias) is carried along."""
    per_group = num_heads // num_kv_groups
    rest = q.shape[1:]
    head_dim = q.shape[0] // num_heads
    if (
        num_heads % num_kv_groups
        or q.shape[0] != num_heads * head_dim
        or k.shape[0] != num_kv_groups * head_dim
        or v.shape != k.shape
        or k.shape[1:] != rest
    ):
        raise UserError(
            f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} do not match "
            f"{num_heads} heads in {num_kv_groups} KV groups"
        )
    qg = q.reshape(num_kv_groups, per_group * head_dim, *rest)
    kg = k.reshape(num_kv_groups, head_dim, *rest)
    vg = v.reshape(num_kv_groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def unfuse_qkv(qkv: Tensor, num_heads: int, num_kv_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``fuse_qkv``: (q, k, v) from a full ``linear_qkv``-shaped tensor."""
    per_group = num_heads // num_kv_groups
    rows = qkv.shape[0]
    if num_heads % num_kv_groups or rows % (num_heads + 2 * num_kv_groups):
        raise UserError(
            f"linear_qkv with {rows} rows does not fit {num_heads} heads in {num_kv_groups} groups"
        )
    head_dim = rows // (num_heads + 2 * num_kv_groups)
    rest = qkv.shape[1:]
    g = qkv.reshape(num_kv_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(g, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(num_heads * head_dim, *rest).clone(),
        k.reshape(num_kv_groups * head_dim, *rest).clone(),
        v.reshape(num_kv_groups * head_dim, *rest).clone(),
    )


def qkv_to_megatron(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_kv_groups: int,
    tp_rank: int = 0, tp_size: int = 1,
) -> Tensor:
    """``linear_qkv`` (weight or bias shaped) held by ``tp_rank``: whole KV groups."""
    if num_kv_groups % tp_size:
        raise UserError(
            f"{num_kv_groups} KV groups are not divisible by tensor parallel size {tp_size}; "
            "choose a TP size that divides every layer's KV groups"
        )
    return column_shard(fuse_qkv(q, k, v, num_heads, num_kv_groups), tp_rank, tp_size)


def qkv_from_megatron(
    shards: Sequence[Tensor], num_heads: int, num_kv_groups: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) from the ``linear_qkv`` shards of all TP ranks, in rank order."""
    return unfuse_qkv(merge_columns(shards), num_heads, num_kv_groups)


def fc1_to_megatron(gate: Tensor, up: Tensor, tp_rank: int = 0, tp_size: int = 1) -> Tensor:
    """``linear_fc1`` held by ``tp_rank``: [gate rows of the rank; up rows of the rank]."""
    if gate.shape != up.shape:
        raise UserError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ")
    return torch.cat(
        [column_shard(gate, tp_rank, tp_size), column_shard(up, tp_rank, tp_size)], dim=0
    )


def fc1_from_megatron(shards: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(gate, up) from the ``linear_fc1`` shards of all TP ranks, in rank order."""
    gates, ups = [], []
    for s in shards:
        if s.shape[0] % 2:
            raise UserError(f"linear_fc1 shard with odd row count {s.shape[0]}")
        g, u = s.chunk(2, dim=0)
        gates.append(g)
        ups.append(u)
    return merge_columns(gates).clone(), merge_columns(ups).clone()


# ----------------------------------------------------------------------------- names
def canonical_names(arch: Architecture) -> list[str]:
    """Every key of the canonical state dict of ``arch``."""
    return list(canonical_shapes(arch))


def _megatron_layer_names(style: str) -> dict[str, str]:
    if style == TE:
        return {
            "input_norm": "self_attention.linear_qkv.layer_norm_weight",
            "mlp_norm": "mlp.linear_fc1.layer_norm_weight",
        }
    if style == LOCAL:
        return {"input_norm": "input_layernorm.weight", "mlp_norm": "pre_mlp_layernorm.weight"}
    raise ValueError(f"unknown megatron naming style {style!r}")


def detect_style(megatron_keys: Iterable[str]) -> str:
    """LOCAL or TE, from the keys of a megatron state dict."""
    return TE if any(k.endswith("linear_qkv.layer_norm_weight") for k in megatron_keys) else LOCAL


def is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def check_canonical(arch: Architecture, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` as a canonical state dict of ``arch``; UserError naming the first missing,
    unexpected or mis-shaped tensor."""
    return check_state_dict(dict(sd), arch, "canonical state dict")


# ----------------------------------------------------------------------------- one layer
def layer_to_megatron(
    hf: Mapping[str, Tensor], layer: LayerShape, tp_rank: int = 0, tp_size: int = 1,
    style: str = LOCAL,
) -> dict[str, Tensor]:
    """One layer's megatron tensors (names relative to ``decoder.layers.N.``) from its HF
    tensors (names relative to ``model.layers.i.``: ``self_attn.q_proj.weight`` ...)."""
    n = _megatron_layer_names(style)
    heads, kv = layer.num_heads, layer.num_kv_groups
    out = {
        n["input_norm"]: hf["input_layernorm.weight"].clone(),
        "self_attention.linear_qkv.weight": qkv_to_megatron(
            hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"],
            hf["self_attn.v_proj.weight"], heads, kv, tp_rank, tp_size,
        ),
        "self_attention.linear_proj.weight": row_shard(hf["self_attn.o_proj.weight"], tp_rank, tp_size),
        n["mlp_norm"]: hf["post_attention_layernorm.weight"].clone(),
        "mlp.linear_fc1.weight": fc1_to_megatron(
            hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"], tp_rank, tp_size
        ),
        "mlp.linear_fc2.weight": row_shard(hf["mlp.down_proj.weight"], tp_rank, tp_size),
    }
    if "self_attn.q_proj.bias" in hf:
        out["self_attention.linear_qkv.bias"] = qkv_to_megatron(
            hf["self_attn.q_proj.bias"], hf["self_attn.k_proj.bias"],
            hf["self_attn.v_proj.bias"], heads, kv, tp_rank, tp_size,
        )
    return out


def layer_from_megatron(
    shards: Sequence[Mapping[str, Tensor]], layer: LayerShape, style: str = LOCAL
) -> dict[str, Tensor]:
    """Inverse of ``layer_to_megatron``: HF-relative names from every TP rank's layer tensors."""
    n = _megatron_layer_names(style)
    heads, kv = layer.num_heads, layer.num_kv_groups
    q, k, v = qkv_from_megatron([s["self_attention.linear_qkv.weight"] for s in shards], heads, kv)
    gate, up = fc1_from_megatron([s["mlp.linear_fc1.weight"] for s in shards])
    out = {
        "input_layernorm.weight": shards[0][n["input_norm"]].clone(),
        "self_attn.q_proj.weight": q,
        "self_attn.k_proj.weight": k,
        "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": merge_rows([s["self_attention.linear_proj.weight"] for s in shards]),
        "post_attention_layernorm.weight": shards[0][n["mlp_norm"]].clone(),
        "mlp.gate_proj.weight": gate,
        "mlp.up_proj.weight": up,
        "mlp.down_proj.weight": merge_rows([s["mlp.linear_fc2.weight"] for s in shards]),
    }
    if "self_attention.linear_qkv.bias" in shards[0]:
        qb, kb, vb = qkv_from_megatron(
            [s["self_attention.linear_qkv.bias"] for s in shards], heads, kv
        )
        out.update({"self_attn.q_proj.bias": qb, "self_attn.k_proj.bias": kb, "self_attn.v_proj.bias": vb})
    return out


# ----------------------------------------------------------------------------- whole model
def to_megatron(
    arch: Architecture,
    sd: Mapping[str, Tensor],
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    style: str = LOCAL,
) -> dict[str, Tensor]:
    """The megatron state dict of shard (tp_rank, pp_rank) from a canonical state dict.

    Layer keys are numbered locally in the stage (``decoder.layers.0`` is the stage's first
    layer). With tied embeddings the last stage of a multi-stage pipeline holds its own
    ``output_layer.weight`` copy of the embedding, as megatron does.
    """
    sd = check_canonical(arch, sd)
    arch.validate(tensor_parallel=tp_size)
    if arch.vocab_size % tp_size:
        raise UserError(
            f"vocab size {arch.vocab_size} is not divisible by tensor parallel size {tp_size}; "
            "choose a TP size that divides the vocabulary"
        )
    return dict(iter_megatron(arch, sd.__getitem__, tp_rank, tp_size, pp_rank, pp_size, style))


def iter_megatron(
    arch: Architecture,
    get: Callable[[str], Tensor],
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    style: str = LOCAL,
) -> Iterator[tuple[str, Tensor]]:
    """``to_megatron`` one megatron tensor at a time, asking ``get`` for each canonical tensor
    when it is needed: a caller that makes canonical tensors on demand (the pruning masks) holds
    at most one layer's of them, never the whole model's."""
    first = pp_rank == 0
    last = pp_rank == pp_size - 1
    if first:
        yield "embedding.word_embeddings.weight", column_shard(get("model.embed_tokens.weight"), tp_rank, tp_size)
    names = canonical_shapes(arch)
    for local, i in enumerate(stage_layers(arch.num_layers, pp_size, pp_rank)):
        prefix = f"model.layers.{i}."
        hf = {k[len(prefix):]: get(k) for k in names if k.startswith(prefix)}
        for name, t in layer_to_megatron(hf, arch.layers[i], tp_rank, tp_size, style).items():
            yield f"decoder.layers.{local}.{name}", t
    if last:
        yield "decoder.final_layernorm.weight", get("model.norm.weight").clone()
        if not arch.tie_word_embeddings:
            yield "output_layer.weight", column_shard(get("lm_head.weight"), tp_rank, tp_size)
        elif not first:
            yield "output_layer.weight", column_shard(get("model.embed_tokens.weight"), tp_rank, tp_size)


def from_megatron(
    arch: Architecture,
    shards: Mapping[tuple[int, int], Mapping[str, Tensor]],
    tp_size: int,
    pp_size: int,
) -> dict[str, Tensor]:
    """The canonical state dict from every shard, keyed ``(tp_rank, pp_rank)``.

    ``_extra_state`` keys are ignored; the naming style is detected from the keys.
    """
    for t in range(tp_size):
        for p in range(pp_size):
            if (t, p) not in shards:
                raise UserError(
                    f"megatron shard tp={t} pp={p} is missing (expected {tp_size}x{pp_size} shards)"
                )
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
    out["model.embed_tokens.weight"] = merge_columns(
        [get(t, 0, "embedding.word_embeddings.weight") for t in range(tp_size)]
    )
    names = list(_megatron_layer_names(style).values()) + [
        "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
        "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
    ]
    if arch.qkv_bias:
        names.append("self_attention.linear_qkv.bias")
    for p in range(pp_size):
        for local, i in enumerate(stage_layers(arch.num_layers, pp_size, p)):
            layer_shards = [
                {n: get(t, p, f"decoder.layers.{local}.{n}") for n in names} for t in range(tp_size)
            ]
            for name, tensor in layer_from_megatron(layer_shards, arch.layers[i], style).items():
                out[f"model.layers.{i}.{name}"] = tensor
    last = pp_size - 1
    out["model.norm.weight"] = get(0, last, "decoder.final_layernorm.weight").clone()
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = merge_columns(
            [get(t, last, "output_layer.weight") for t in range(tp_size)]
        )
    return check_canonical(arch, out)


def all_shards(
    arch: Architecture, sd: Mapping[str, Tensor], tp_size: int, pp_size: int, style: str = LOCAL
) -> Dict[tuple[int, int], dict[str, Tensor]]:
    """Every shard ``{(tp_rank, pp_rank): state dict}`` of a tp_size x pp_size layout."""
    return {
        (t, p): to_megatron(arch, sd, t, tp_size, p, pp_size, style)
        for p in range(pp_size)
        for t in range(tp_size)
    }


# ----------------------------------------------------------------------------- shard -> canonical pieces
_NORM_TO_CANONICAL = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
}


def canonical_pieces(
    arch: Architecture,
    name: str,
    t: Tensor,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    check: bool = True,
) -> dict[str, tuple[Tensor, dict[int, int]]]:
    """The parts of canonical tensors that megatron tensor ``name`` of shard (tp_rank, pp_rank)
    holds: ``{canonical name: (piece, {dim: start})}``.

    ``t`` may be the weight or anything shaped like it (a gradient, an Adam moment, a mask);
    pieces are views of ``t``, except the q/k/v pieces of ``linear_qkv`` (copies).
    ``{dim: start}`` has one entry per dimension that tensor parallelism splits (where this
    rank's piece starts in the canonical tensor), so an empty dict means the tensor is
    replicated on every TP rank (norms). A stage's local layer numbers become global layer
    positions. With tied embeddings the last stage's
    ``output_layer.weight`` (megatron's copy of the embedding) maps to the embedding.
    ``_extra_state`` keys give nothing. ``check=False`` skips the shape check against the
    architecture (for hot paths that feed tensors of a model built from it).
    """
    if is_extra_state(name):
        return {}
    vocab_rows = {0: tp_rank * (arch.vocab_size // tp_size)}
    if name == "embedding.word_embeddings.weight":
        pieces = {"model.embed_tokens.weight": (t, vocab_rows)}
    elif name == "output_layer.weight":
        target = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        pieces = {target: (t, vocab_rows)}
    elif name == "decoder.final_layernorm.weight":
        pieces = {"model.norm.weight": (t, {})}
    elif name.startswith("decoder.layers."):
        parts = name.split(".")
        local, rest = int(parts[2]), ".".join(parts[3:])
        held = stage_layers(arch.num_layers, pp_size, pp_rank)
        if local >= len(held):
            raise UserError(
                f"{name}: pipeline stage {pp_rank} of {pp_size} holds only {len(held)} layers; "
                "the tensors were made for another architecture or layout"
            )
        i = held[local]
        pieces = {f"model.layers.{i}.{k}": v for k, v in _layer_pieces(arch, i, rest, t, tp_rank, tp_size).items()}
    else:
        raise UserError(f"no canonical tensor corresponds to megatron tensor {name}")
    if check:
        _check_pieces(arch, name, pieces, tp_size)
    return pieces


def _layer_pieces(arch: Architecture, i: int, rest: str, t: Tensor, tp_rank: int, tp_size: int):
    shape, d = arch.layers[i], arch.head_dim
    heads, kv, ffn = (n // tp_size for n in (shape.num_heads, shape.num_kv_groups, shape.ffn_hidden_size))
    if rest in _NORM_TO_CANONICAL:
        return {_NORM_TO_CANONICAL[rest]: (t, {})}
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        # A TP shard holds whole KV groups, so it is itself a fused qkv of the local heads.
        q, k, v = unfuse_qkv(t, heads, kv)
        kind = rest.rsplit(".", 1)[1]
        return {
            f"self_attn.q_proj.{kind}": (q, {0: tp_rank * heads * d}),
            f"self_attn.k_proj.{kind}": (k, {0: tp_rank * kv * d}),
            f"self_attn.v_proj.{kind}": (v, {0: tp_rank * kv * d}),
        }
    if rest == "mlp.linear_fc1.weight":
        gate, up = t.chunk(2, dim=0)
        return {"mlp.gate_proj.weight": (gate, {0: tp_rank * ffn}), "mlp.up_proj.weight": (up, {0: tp_rank * ffn})}
    if rest == "self_attention.linear_proj.weight":
        return {"self_attn.o_proj.weight": (t, {1: tp_rank * heads * d})}
    if rest == "mlp.linear_fc2.weight":
        return {"mlp.down_proj.weight": (t, {1: tp_rank * ffn})}
    raise UserError(f"no canonical tensor corresponds to megatron tensor decoder.layers.N.{rest}")


def _check_pieces(arch: Architecture, name: str, pieces: dict, tp_size: int) -> None:
    """Each piece must be the TP share (split dims) or the whole (other dims) of its tensor."""
    shapes = canonical_shapes(arch)
    for canon, (piece, offsets) in pieces.items():
        full = shapes.get(canon)
        want = None if full is None else tuple(
            n // tp_size if dim in offsets else n for dim, n in enumerate(full)
        )
        if want is None or tuple(piece.shape) != want:
            raise UserError(
                f"megatron tensor {name} gives {canon} a piece of shape {tuple(piece.shape)}, the "
                f"architecture at tensor parallel size {tp_size} needs {want}; the tensors were made "
                "for another architecture or layout"
            )


# ----------------------------------------------------------------------------- one tensor, both ways
def canonical_from_shards(
    arch: Architecture,
    name: str,
    shards: Sequence[Tensor],
    pp_rank: int = 0,
    pp_size: int = 1,
) -> dict[str, Tensor]:
    """The full canonical tensors that megatron tensor ``name`` holds parts of, from every TP
    rank's copy of it (``shards`` in TP rank order, all of one pipeline stage).

    Works on anything shaped like the weight (fp32 masters, Adam moments); pure data movement,
    so a round trip through ``megatron_tensor`` is exact. Replicated tensors (norms) are
    taken from TP rank 0. One megatron tensor at a time: the transient is one full tensor.
    """
    tp_size = len(shards)
    shapes = canonical_shapes(arch)
    out: dict[str, Tensor] = {}
    for tp_rank, t in enumerate(shards):
        for canon, (piece, offsets) in canonical_pieces(arch, name, t, tp_rank, tp_size, pp_rank, pp_size).items():
            if not offsets:
                if tp_rank == 0:
                    out[canon] = piece.clone()
                continue
            if canon not in out:
                out[canon] = torch.empty(shapes[canon], dtype=piece.dtype, device=piece.device)
            index = [slice(None)] * piece.dim()
            for dim, start in offsets.items():
                index[dim] = slice(start, start + piece.shape[dim])
            out[canon][tuple(index)] = piece
    return out


def megatron_tensor(
    arch: Architecture,
    name: str,
    canon: Mapping[str, Tensor],
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
) -> Tensor:
    """Shard ``tp_rank`` of megatron tensor ``name`` (layer numbers local to stage ``pp_rank``)
    from the full canonical tensors it holds parts of (``canonical_from_shards``' output, or a
    canonical state dict): the one-tensor inverse of ``canonical_pieces``."""

    def get(key: str) -> Tensor:
        if key not in canon:
            raise UserError(f"megatron tensor {name} needs canonical tensor {key}, which is missing")
        return canon[key]

    if name == "embedding.word_embeddings.weight":
        return column_shard(get("model.embed_tokens.weight"), tp_rank, tp_size)
    if name == "output_layer.weight":
        src = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return column_shard(get(src), tp_rank, tp_size)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight").clone()
    if not name.startswith("decoder.layers."):
        raise UserError(f"no canonical tensor corresponds to megatron tensor {name}")
    parts = name.split(".")
    local, rest = int(parts[2]), ".".join(parts[3:])
    held = stage_layers(arch.num_layers, pp_size, pp_rank)
    if local >= len(held):
        raise UserError(f"{name}: pipeline stage {pp_rank} of {pp_size} holds only {len(held)} layers")
    i = held[local]
    shape, pre = arch.layers[i], f"model.layers.{i}."
    if rest in _NORM_TO_CANONICAL:
        return get(pre + _NORM_TO_CANONICAL[rest]).clone()
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return qkv_to_megatron(get(f"{pre}self_attn.q_proj.{kind}"), get(f"{pre}self_attn.k_proj.{kind}"),
                               get(f"{pre}self_attn.v_proj.{kind}"), shape.num_heads, shape.num_kv_groups,
                               tp_rank, tp_size)
    if rest == "mlp.linear_fc1.weight":
        return fc1_to_megatron(get(pre + "mlp.gate_proj.weight"), get(pre + "mlp.up_proj.weight"), tp_rank, tp_size)
    if rest == "self_attention.linear_proj.weight":
        return row_shard(get(pre + "self_attn.o_proj.weight"), tp_rank, tp_size)
    if rest == "mlp.linear_fc2.weight":
        return row_shard(get(pre + "mlp.down_proj.weight"), tp_rank, tp_size)
    raise UserError(f"no canonical tensor corresponds to megatron tensor {name}")
