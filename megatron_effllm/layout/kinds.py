"""How a megatron-core tensor holds its canonical tensor(s) under tensor parallelism: one
``Kind`` per way, each with its math written once in both directions.

- ``REPLICATED``: the same tensor on every TP rank (norms).
- ``VOCAB``: rows split into contiguous blocks (vocab-parallel embedding and output layer).
- ``ROW``: columns (input features) split (row-parallel ``linear_proj`` / ``linear_fc2``).
- ``FUSED_QKV``: q, k and v fused into ``linear_qkv`` with megatron's per-KV-group interleaving
  ``[q heads of group g..., k_g, v_g]`` for each group g (biases alike); under TP each rank
  holds a contiguous block of whole KV groups, so a rank's shard is itself a fused qkv of its
  local heads.
- ``FUSED_GATE_UP``: ``linear_fc1`` = ``[gate rows of the rank; up rows of the rank]`` on every
  TP rank (the full tensor at TP=1 is ``[gate; up]``).

Everything works on any tensor shaped like the weight (gradients, Adam moments, 0/1 masks), so
they map the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_effllm.architecture import LayerShape
from megatron_effllm.errors import UserError
from megatron_effllm.layout.dims import ParallelDims

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- primitives
def column_shard(t: Tensor, dims: ParallelDims = ParallelDims()) -> Tensor:
    """Rows (output features) of ``t`` held by TP rank ``dims.tp_rank``."""
    if t.shape[0] % dims.tp:
        raise UserError(f"dimension {t.shape[0]} is not divisible by tensor parallel size {dims.tp}")
    return t.chunk(dims.tp, dim=0)[dims.tp_rank].clone()


def row_shard(t: Tensor, dims: ParallelDims = ParallelDims()) -> Tensor:
    """Columns (input features) of ``t`` held by TP rank ``dims.tp_rank``."""
    if t.shape[1] % dims.tp:
        raise UserError(f"dimension {t.shape[1]} is not divisible by tensor parallel size {dims.tp}")
    return t.chunk(dims.tp, dim=1)[dims.tp_rank].clone()


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
    """Inverse of ``fuse_qkv``: (q, k, v) copies from a ``linear_qkv``-shaped tensor."""
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
    dims: ParallelDims = ParallelDims(),
) -> Tensor:
    """``linear_qkv`` (weight or bias shaped) held by TP rank ``dims.tp_rank``: whole KV groups."""
    if num_kv_groups % dims.tp:
        raise UserError(
            f"{num_kv_groups} KV groups are not divisible by tensor parallel size {dims.tp}; "
            "choose a TP size that divides every layer's KV groups"
        )
    return column_shard(fuse_qkv(q, k, v, num_heads, num_kv_groups), dims)


def fc1_to_megatron(gate: Tensor, up: Tensor, dims: ParallelDims = ParallelDims()) -> Tensor:
    """``linear_fc1`` held by TP rank ``dims.tp_rank``: [gate rows of the rank; up rows of the rank]."""
    if gate.shape != up.shape:
        raise UserError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ")
    return torch.cat([column_shard(gate, dims), column_shard(up, dims)], dim=0)


# ----------------------------------------------------------------------------- kinds
@dataclass(frozen=True)
class Kind:
    """One way a megatron tensor holds canonical tensors.

    ``shard(parts, layer, dims)``: a TP rank's megatron tensor from the full canonical parts.
    ``unshard(t, layer, tp)``: the rank's pieces of each canonical part (in table order) from
    its megatron tensor. ``split``: the dimensions of each part that TP divides (the pieces
    are the TP share there and whole elsewhere). ``layer`` is the layer's shape (None outside
    the layers).
    """

    name: str
    split: tuple[int, ...]
    shard: Callable[[Sequence[Tensor], Optional[LayerShape], ParallelDims], Tensor]
    unshard: Callable[[Tensor, Optional[LayerShape], int], tuple[Tensor, ...]]


REPLICATED = Kind("replicated", (), lambda parts, layer, dims: parts[0].clone(), lambda t, layer, tp: (t,))
VOCAB = Kind("vocab", (0,), lambda parts, layer, dims: column_shard(parts[0], dims), lambda t, layer, tp: (t,))
ROW = Kind("row", (1,), lambda parts, layer, dims: row_shard(parts[0], dims), lambda t, layer, tp: (t,))
FUSED_QKV = Kind(
    "fused_qkv", (0,),
    lambda parts, layer, dims: qkv_to_megatron(*parts, layer.num_heads, layer.num_kv_groups, dims),
    lambda t, layer, tp: unfuse_qkv(t, layer.num_heads // tp, layer.num_kv_groups // tp),
)
FUSED_GATE_UP = Kind(
    "fused_gate_up", (0,),
    lambda parts, layer, dims: fc1_to_megatron(*parts, dims),
    lambda t, layer, tp: tuple(t.chunk(2, dim=0)),
)
