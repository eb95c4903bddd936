"""Pruning statistics and decisions across data/tensor/pipeline-parallel ranks.

The pruning core (``pruning/``) works on canonical tensors in one process. This adapter is where
process groups enter (every collective through ``parallel.comm``):

- ``feed_parameter`` adds one rank's *local* megatron parameter (weight and gradient) to a
  ``GradSaliency`` of the full architecture: the training runtime's gradient hooks call it for
  every parameter and micro-batch, ``feed_local_tensors`` / ``feed_saliency`` for a whole shard.
  Every piece lands at its place in the canonical tensors (``layout.canonical_pieces``: heads /
  KV groups / FFN channels of the TP shard, o_proj / down_proj columns, vocab rows of the
  embedding and output layer, which give partial sums for the hidden channels; a stage's local
  layers at their global positions), so the states of all TP x PP ranks of a model replica
  *sum* to the full-model accumulator. Tensors replicated over TP (norms) are fed on TP rank 0
  only; the batch count is added once per replica (TP rank 0 of the first stage).
- ``reduce_saliency`` sums those states over TP, PP and DP: zero-padded partial vectors summed
  are the gathered vectors, and the DP sum makes the result that of one process that saw every
  rank's micro-batches. The vectors are tiny (one float per group).
- ``check_same_decision`` hashes a decision and compares it over the ranks
  (``comm.check_agreement``), raising on every rank if any differs, before a weight is touched.
- ``local_weight_masks`` turns a canonical mask dict into this rank's megatron-named 0/1
  tensors (applied to the live model by ``training.runtime.live_model.LiveMasks``).

Gradients fed must be this rank's own (before any data-parallel reduction), and the embedding
gradient of a tied model under PP must already be the sum of both copies when fed whole
(megatron's finalize_model_grads does this; after a bare pipeline schedule call
``allreduce_tied_embedding_grads_``).
"""
from __future__ import annotations

import copy
import json
from typing import Mapping, Optional, Union

import torch

from megatron_effllm import layout
from megatron_effllm.architecture import Architecture
from megatron_effllm.layout.dims import ParallelDims
from megatron_effllm.parallel import comm
from megatron_effllm.pruning.groups import PrunePlan, PruningError, tensor_axes
from megatron_effllm.pruning.saliency import GradSaliency, elementwise
from megatron_effllm.pruning.surgery import check_masks, mask_tensor


# ---------------------------------------------------------------------- feeding
def feed_parameter(saliency: GradSaliency, name: str, w: torch.Tensor, g: torch.Tensor, dims: ParallelDims,
                   *, check: bool = True, seen: Optional[set] = None) -> None:
    """Add w * g of one megatron parameter ``name`` of shard ``dims`` to ``saliency``.

    ``w`` and ``g`` are already in the dtype the sums are formed in, and ``g`` is scaled to a sum
    over the samples it averages (the caller multiplies). Pieces replicated over TP (norms) are
    added on TP rank 0 only. ``check=False`` skips the shape check (hot path: tensors of a model
    built from the architecture); ``seen`` collects canonical names to refuse two tensors of one
    shard mapping to the same one."""
    w_pieces = layout.canonical_pieces(saliency.arch, name, w, dims, check=check)
    g_pieces = layout.canonical_pieces(saliency.arch, name, g, dims, check=check)
    for canon, (wc, off) in w_pieces.items():
        if not off and dims.tp_rank != 0:
            continue  # replicated on every TP rank (norms): counted on TP rank 0
        if seen is not None:
            if canon in seen:
                raise PruningError(f"two megatron tensors of one shard map to {canon}; the model does not "
                                   "follow the megatron GPT layout")
            seen.add(canon)
        wg = wc * g_pieces[canon][0]
        for q in saliency.quantities:
            saliency.add_elementwise(q, canon, elementwise(q, wg), off)


def feed_local_tensors(
    saliency: GradSaliency,
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, Optional[torch.Tensor]],
    count: float,
    dims: ParallelDims = ParallelDims(),
    *,
    add_count: Optional[bool] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> None:
    """Add one shard's megatron-named weights and gradients to ``saliency`` (no process group).

    ``grads`` are gradients of the loss averaged over ``count`` samples (as in
    ``GradSaliency.update``); names with a None gradient are skipped. With tied embeddings the
    last stage's ``output_layer.weight`` is skipped: its gradient is counted on the first stage
    (after ``allreduce_tied_embedding_grads_``). ``add_count`` defaults to "this is TP rank 0 of
    the first stage", the one rank per model replica that counts the batch.
    ``compute_dtype=torch.float64`` forms the per-group sums in float64, which makes them
    independent of the layout up to float64 rounding (the default, float32 for float32 or
    bf16 weights, sums in an order that depends on the shard); it costs a float64 copy of one
    tensor at a time.
    """
    seen: set[str] = set()
    for name, g in grads.items():
        if g is None:
            continue
        if name == "output_layer.weight" and saliency.arch.tie_word_embeddings:
            continue  # megatron's last-stage copy of the embedding: the first stage counts it
        w = weights[name]
        dt = compute_dtype or torch.promote_types(torch.promote_types(w.dtype, g.dtype), torch.float32)
        # One tensor at a time, so at most one tensor's products are alive.
        feed_parameter(saliency, name, w.to(dt), g.to(dt) * count, dims, seen=seen)
    if add_count is None:
        add_count = dims.replica_leader
    if add_count:
        saliency.add_count(count)


def feed_saliency(
    saliency: GradSaliency,
    model: torch.nn.Module,
    count: float,
    *,
    grads: Optional[Mapping[str, torch.Tensor]] = None,
    add_count: Optional[bool] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> None:
    """Add this rank's part of a (TP/PP-sharded) megatron GPTModel to ``saliency``.

    Reads every parameter and its ``.grad`` (or ``grads[name]``, keyed by parameter name, e.g.
    gradients captured by hooks); the layout comes from the running process's groups
    (``comm.dims()``). Local: no communication. Call ``reduce_saliency`` before deciding.
    ``count``, ``add_count`` and ``compute_dtype`` as in ``feed_local_tensors``.
    """
    weights, local_grads = {}, {}
    for name, p in model.named_parameters():
        weights[name] = p.detach()
        local_grads[name] = grads.get(name) if grads is not None else p.grad
    if all(g is None for g in local_grads.values()):
        # e.g. a wrapper that keeps gradients elsewhere (megatron DDP's main_grad): pass grads=
        raise PruningError("no parameter of this rank has a gradient to score; run backward first or "
                           "pass the gradients as grads={name: tensor}")
    feed_local_tensors(saliency, weights, local_grads, count, comm.dims(), add_count=add_count,
                       compute_dtype=compute_dtype)


def allreduce_tied_embedding_grads_(model: torch.nn.Module) -> None:
    """Sum the gradients of the two copies of a tied embedding (first and last pipeline stage),
    in place, as megatron's finalize_model_grads does; nothing to do without PP or tying.
    Collective over the embedding group: call it on every rank."""
    if comm.size("pp") == 1 or not getattr(model, "share_embeddings_and_output_weights", False):
        return
    if not comm.in_embedding_group():
        return
    weight = model.shared_embedding_or_output_weight()
    if weight.grad is None:
        raise PruningError("the tied embedding has no gradient on this stage; run a backward pass first")
    comm.all_reduce_(weight.grad, "embedding")


# ---------------------------------------------------------------------- reduction
def reduce_saliency(
    saliency: GradSaliency, *, model_parallel: bool = True, data_parallel: bool = True
) -> GradSaliency:
    """A copy of ``saliency`` whose state is summed over the TP and PP groups (completing the
    partial, zero-padded per-rank vectors) and over the DP group (every rank's micro-batches).

    Collective: every rank calls it. The running local state is left untouched, so
    accumulation continues and the next reduction counts nothing twice. Without
    torch.distributed this is a plain copy.
    """
    out = copy.deepcopy(saliency)
    groups = (["tp", "pp"] if model_parallel else []) + (["dp"] if data_parallel else [])
    keys = sorted(out.state)
    out.state = dict(zip(keys, comm.all_reduce_flat([out.state[k] for k in keys], groups)))
    return out


# ---------------------------------------------------------------------- agreement
Decision = Union[PrunePlan, Architecture, bytes, bytearray, str, dict, list]


def decision_bytes(decision: Decision) -> bytes:
    """A deterministic byte string of a decision: a PrunePlan (its new Architecture and every
    kept-index list), an Architecture, JSON-able data, or bytes/str as they are."""
    if isinstance(decision, PrunePlan):
        decision = {"after": decision.after.to_dict(), "plan": decision.to_dict()}
    elif isinstance(decision, Architecture):
        decision = decision.to_dict()
    if isinstance(decision, (bytes, bytearray)):
        return bytes(decision)
    if isinstance(decision, str):
        return decision.encode()
    return json.dumps(decision, sort_keys=True, separators=(",", ":")).encode()


def check_same_decision(decision: Decision, group_name: comm.GroupName = "world") -> str:
    """Raise ``comm.AgreementError`` on every rank of the group unless all of them hold the same
    decision; returns its sha256 (hex). Collective: every rank calls it with its own decision."""
    return comm.check_agreement(
        decision_bytes(decision), "the pruning decision", group_name,
        advice="Every rank must select from the same reduced scores (reduce_saliency over DP/TP/PP) "
               "with the same selector and constraints")


# ---------------------------------------------------------------------- masks on shards
def local_weight_masks(
    arch: Architecture,
    masks: Mapping[str, torch.Tensor],
    dims: ParallelDims = ParallelDims(),
    *,
    style: str = layout.LOCAL,
    device: Optional[torch.device] = None,
) -> dict[str, torch.Tensor]:
    """0/1 tensors, megatron-named for shard ``dims``, for the weights ``masks`` touch
    (all-ones tensors are left out). Multiplying the shard's weights by them zeroes exactly what
    ``surgery.mask_state_dict`` zeroes in the canonical tensors (bool, on ``device``: the
    model's, so that on a GPU the masking runs there). Built one tensor at a time from
    zero-stride ones, so that a prune event (every step, at k = 1) holds this shard's masks and
    one layer's canonical tensors, not a byte per weight of the whole model on every rank."""
    masks = dict(masks)
    check_masks(arch, masks)
    shapes, axes = layout.canonical_shapes(arch), tensor_axes(arch)
    one = torch.ones((), dtype=torch.bool, device=device)

    def canonical_mask(name: str) -> torch.Tensor:
        return mask_tensor(name, one.expand(shapes[name]), arch, masks, axes[name])

    return {k: m for k, m in layout.iter_megatron(arch, canonical_mask, dims, style) if not bool(m.all())}
