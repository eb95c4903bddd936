"""A stand-in for megatron-core's TransformerEngine layer spec on a machine without TE.

It mirrors the module tree and parameter names of ``get_gpt_layer_with_transformer_engine_spec``
where the pruning code depends on them: ``input_layernorm`` and ``pre_mlp_layernorm`` are
``IdentityOp``s and the RMSNorms are fused into ``self_attention.linear_qkv`` and
``mlp.linear_fc1`` (``layer_norm_weight``, ``eps``, then the column-parallel matmul, returning
``(output, bias)`` as megatron's linears do). The arithmetic is megatron's local modules'.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.identity_op import IdentityOp


class StubLayerNormColumnParallelLinear(ColumnParallelLinear):
    """TE's LayerNormColumnParallelLinear (RMSNorm variant): norm, then the split matmul."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        kwargs.pop("tp_comm_buffer_name", None)
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        self.layer_norm_weight.sequence_parallel = config.sequence_parallel  # as TE marks it

    def forward(self, x, *args, **kwargs):
        normed = torch.nn.functional.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(normed, *args, **kwargs)


def te_like_spec():
    """megatron's local GPT layer spec rearranged into TE's module tree (see the module doc)."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer = spec.submodules
    attention = dataclasses.replace(layer.self_attention, submodules=dataclasses.replace(
        layer.self_attention.submodules, linear_qkv=StubLayerNormColumnParallelLinear))
    mlp = dataclasses.replace(layer.mlp, submodules=dataclasses.replace(
        layer.mlp.submodules, linear_fc1=StubLayerNormColumnParallelLinear))
    return dataclasses.replace(spec, submodules=dataclasses.replace(
        layer, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp, self_attention=attention, mlp=mlp))


def use_te_stub(monkeypatch) -> None:
    """Make ``build_gpt_model(..., use_te=True)`` build the stand-in."""
    from megatron_effllm.model import builder

    monkeypatch.setattr(builder, "te_available", lambda: True)
    monkeypatch.setattr(builder, "get_gpt_layer_with_transformer_engine_spec", te_like_spec)
