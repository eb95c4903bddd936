"""Where every tensor lives: the canonical (HF Llama) schema, the megatron-core parameter map
derived from one declarative table, pipeline placement, and the parallel dimensions.

- ``canonical``: the canonical state dict (names, symbolic shapes, ``check_state_dict``);
- ``megatron``: the table of megatron-core tensors and the four directions derived from it;
- ``kinds``: the tensor-parallel math of each kind of megatron tensor (fused qkv, gate/up, ...);
- ``pipeline``: which layers each pipeline stage holds;
- ``dims``: ``ParallelDims``, one shard's place in a TP x PP x DP layout.

Pure tensor math: no process group is needed to use anything here. Callers write
``from megatron_effllm import layout`` and ``layout.canonical_pieces(...)``.
"""
from megatron_effllm.layout.canonical import (
    FFN,
    HEAD,
    HIDDEN,
    KV,
    TENSORS,
    VOCAB,
    canonical_shapes,
    check_state_dict,
    dim_size,
    iter_tensors,
    layer_of,
    layer_prefix,
    renumber,
    tensor_shape,
)
from megatron_effllm.layout.dims import ParallelDims
from megatron_effllm.layout.kinds import (
    column_shard,
    fc1_to_megatron,
    fuse_qkv,
    qkv_to_megatron,
    row_shard,
    unfuse_qkv,
)
from megatron_effllm.layout.megatron import (
    LOCAL,
    PARAMS,
    TE,
    all_shards,
    canonical_from_shards,
    canonical_pieces,
    detect_style,
    entry,
    from_megatron,
    is_extra_state,
    iter_megatron,
    megatron_shapes,
    megatron_tensor,
    shard_entries,
    to_megatron,
)
from megatron_effllm.layout.pipeline import stage_layer_counts, stage_layers

__all__ = [
    "FFN", "HEAD", "HIDDEN", "KV", "TENSORS", "VOCAB", "canonical_shapes", "check_state_dict",
    "dim_size", "iter_tensors", "layer_of", "layer_prefix", "renumber", "tensor_shape",
    "ParallelDims",
    "column_shard", "fc1_to_megatron", "fuse_qkv", "qkv_to_megatron", "row_shard", "unfuse_qkv",
    "LOCAL", "PARAMS", "TE", "all_shards", "canonical_from_shards", "canonical_pieces",
    "detect_style", "entry", "from_megatron", "is_extra_state", "iter_megatron",
    "megatron_shapes", "megatron_tensor", "shard_entries", "to_megatron",
    "stage_layer_counts", "stage_layers",
]
