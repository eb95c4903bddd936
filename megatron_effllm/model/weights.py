"""Move canonical (HF-named) weights into and out of a built, possibly sharded GPTModel."""
from __future__ import annotations

import math
from typing import Mapping

import torch

from megatron_effllm import layout
from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError
from megatron_effllm.parallel import comm


def local_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors (no ``_extra_state``), sharing storage with its parameters."""
    return {
        k: v for k, v in model.state_dict().items()
        if not layout.is_extra_state(k) and isinstance(v, torch.Tensor)
    }


def model_style(model: torch.nn.Module) -> str:
    return layout.detect_style(local_state_dict(model).keys())


def load_local(model: torch.nn.Module, local: Mapping[str, torch.Tensor]) -> None:
    """Copy a megatron shard state dict into ``model`` (keys and shapes must match exactly)."""
    own = local_state_dict(model)
    missing = sorted(set(own) - set(local))
    unexpected = sorted(set(local) - set(own))
    if missing or unexpected:
        raise UserError(
            f"weights do not fit this model shard: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; they were made for another architecture or layout"
        )
    for k, t in own.items():
        if tuple(t.shape) != tuple(local[k].shape):
            raise UserError(
                f"{k}: model shard needs shape {tuple(t.shape)}, weights have "
                f"{tuple(local[k].shape)}; they were made for another architecture or layout"
            )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(local[k])


def load_canonical(model: torch.nn.Module, arch: Architecture, sd: Mapping[str, torch.Tensor]) -> None:
    """Load a canonical state dict into this rank's shard of the model."""
    load_local(model, layout.to_megatron(arch, sd, comm.dims(), model_style(model)))


def load_canonical_masters(engine, arch: Architecture, sd: Mapping[str, torch.Tensor]) -> None:
    """Write a canonical state dict into every copy a training engine keeps of this rank's
    shard, its fp32 masters included: a bf16 engine makes its masters from the bf16 module, so
    an fp32 source would otherwise start training from its values rounded to bf16."""
    local = layout.to_megatron(arch, sd, comm.dims(), model_style(engine.module))
    for name, p in engine.module.named_parameters():
        engine.set_full_param(p, local[name].float())


def gather_shards(model: torch.nn.Module) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Every model-parallel rank's shard state dict (CPU copies), keyed (tp_rank, pp_rank),
    on every rank of the model-parallel group."""
    return _gather_over_model_parallel(
        {k: v.detach().cpu().clone() for k, v in local_state_dict(model).items()}
    )


def _gather_over_model_parallel(mine: dict) -> dict[tuple[int, int], dict]:
    """Every model-parallel rank's ``{name: tensor}`` (CPU), keyed (tp_rank, pp_rank).

    Without pipeline parallelism every TP rank has the same names and shapes, so the shards
    travel tensor by tensor through the communication device (an all-gather per tensor: the
    transient there is one full tensor, not the pickled model); across pipeline stages the
    names differ and the dicts go as objects."""
    dims = comm.dims()
    if dims.tp * dims.pp == 1:
        return {(0, 0): mine}
    if dims.pp == 1:
        out: dict[tuple[int, int], dict] = {(t, 0): {} for t in range(dims.tp)}
        for name in sorted(mine):
            for r, part in enumerate(comm.all_gather(mine[name], "tp")):
                out[(r, 0)][name] = part.cpu()
        return out
    return dict(comm.all_gather_object(((dims.tp_rank, dims.pp_rank), mine), "mp"))


def gather_canonical(model: torch.nn.Module, arch: Architecture) -> dict[str, torch.Tensor]:
    """The full canonical state dict of a sharded model, on every model-parallel rank."""
    dims = comm.dims()
    return layout.from_megatron(arch, gather_shards(model), dims.tp, dims.pp)


def gather_canonical_grads(model: torch.nn.Module, arch: Architecture) -> dict[str, torch.Tensor]:
    """The canonical gradients (``.grad`` of every parameter) of a sharded model, on every
    model-parallel rank. With tied embeddings under pipeline parallelism the embedding's
    gradient is the first stage's: sum the two copies first (megatron's finalize_model_grads,
    or ``parallel.distributed_pruning.allreduce_tied_embedding_grads_``)."""
    dims = comm.dims()
    mine = {}
    for k, p in model.named_parameters():
        if p.grad is None:
            raise UserError(f"parameter {k} has no gradient; run a backward pass first")
        mine[k] = p.grad.detach().cpu().clone()
    return layout.from_megatron(arch, _gather_over_model_parallel(mine), dims.tp, dims.pp)


def random_canonical(arch: Architecture, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A randomly initialised canonical state dict, the same at every TP/PP layout.

    megatron-core's own initialisation draws each stage's layers from that stage's generator,
    so a from-scratch model would differ between PP=1 and PP=2 (and a run's result with its
    layout). This draws the whole model once, in canonical order, from one generator:
    megatron's scheme (normal(0, std); the residual writers o_proj / down_proj scaled by
    1/sqrt(2 * layers); norms one, biases zero).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    scaled = std / math.sqrt(2.0 * max(arch.num_layers, 1))
    out: dict[str, torch.Tensor] = {}
    for name, shape in layout.canonical_shapes(arch).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            out[name] = torch.zeros(shape)
        else:
            s = scaled if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            out[name] = torch.empty(shape).normal_(0.0, s, generator=gen)
    return out
