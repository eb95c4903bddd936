"""Sequence parallelism (megatron's ``sequence_parallel``) without apex or TransformerEngine norms.

Under sequence parallelism the hidden states between the tensor-parallel regions are split along
the sequence over the TP ranks: the norms, the residual adds and the layer outputs see one slice
of the tokens each. megatron-core's torch norm refuses that layout (only apex's and TE's accept
it), so the local spec takes ``RMSNorm`` below. A norm's weight then gets the gradient of this
rank's tokens only; megatron adds the slices in ``finalize_model_grads`` for every parameter
marked ``sequence_parallel``. Here the sum happens inside the backward
(``reduce_sequence_parallel_grads``): the pruning runtime's gradient hooks turn each micro-batch's
gradient into scores through nonlinear functions, so they must read the whole gradient, and ZeRO
takes gradients away while the backward runs.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_effllm.parallel import comm


class RMSNorm(torch.nn.Module):
    """RMSNorm with megatron's norm constructor, the arithmetic of ``torch.nn.RMSNorm`` (what
    megatron's torch norm builds) and a weight marked ``sequence_parallel`` when the config is."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def sequence_parallel_block(layer_spec: ModuleSpec, config, *, fused_norms: bool) -> TransformerBlockSubmodules:
    """The block spec for ``layer_spec`` under sequence parallelism: the final norm (and, for the
    local spec, the layers' two norms) is ``RMSNorm``. TransformerEngine's spec fuses the layers'
    norms into its linears (``fused_norms``), which take sequence slices themselves."""
    if not fused_norms:
        layer = dataclasses.replace(layer_spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
        layer_spec = dataclasses.replace(layer_spec, submodules=layer)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(config),
                                      layer_norm=RMSNorm)


def reduce_sequence_parallel_grads(model: torch.nn.Module) -> list:
    """Sum the gradient of every parameter marked ``sequence_parallel`` (the norms' weights, TE's
    fused ``layer_norm_weight``) over the tensor-parallel group as it is produced, each micro-batch:
    the hooks registered after these (the saliency feed) and the engine's accumulation see the
    whole gradient. Returns the hook handles."""

    def whole(grad: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce_(grad.clone(memory_format=torch.contiguous_format), "tp")

    return [p.register_hook(whole) for p in model.parameters()
            if p.requires_grad and getattr(p, "sequence_parallel", False)]


def factor_for_column_shards(factor: torch.Tensor, tokens: int) -> torch.Tensor:
    """A per-token ``factor`` ([tokens here, ..., 1]) of a column-parallel linear's input, ready to
    multiply the linear's output ([``tokens``, ..., own columns]): gathered along the sequence when
    the input was a sequence slice, as the linear gathers its input. Either way its gradient is
    summed over the TP ranks (each holds other columns), as the linear sums its input's."""
    if factor.shape[0] != tokens:
        return gather_from_sequence_parallel_region(factor, tensor_parallel_output_grad=True)
    return copy_to_tensor_model_parallel_region(factor)
