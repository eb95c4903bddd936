"""Pruning statistics and decisions across data/tensor/pipeline-parallel ranks.

The pruning core (``pruning/``) works on canonical tensors in one process. This adapter is where
process groups enter:

- ``feed_saliency`` adds one rank's *local* megatron parameters and gradients to a
  ``GradSaliency`` of the full architecture. Every piece lands at its place in the canonical
  tensors (``layout.canonical_pieces``: heads / KV groups / FFN channels of the
  TP shard, o_proj / down_proj columns, vocab rows of the embedding and output layer, which give
  partial sums for the hidden channels; a stage's local layers at their global positions), so
  the states of all TP x PP ranks of a model replica *sum* to the full-model accumulator.
  Tensors replicated over TP (norms) are fed on TP rank 0 only; with tied embeddings under PP
  the last stage's copy of the embedding is skipped (counted once, on the first stage); the
  batch count is added once per replica (TP rank 0 of the first stage).
- ``reduce_saliency`` sums those states over TP, PP and DP: zero-padded partial vectors summed
  are the gathered vectors, and the DP sum makes the result that of one process that saw every
  rank's micro-batches. The vectors are tiny (one float per group).
- ``check_same_decision`` hashes a decision and compares it over the ranks (all-reduce MIN and
  MAX), raising ``DecisionMismatchError`` on every rank if any differs, before a weight is touched.
- ``local_weight_masks`` / ``apply_masks_`` apply a canonical mask dict to this rank's shards
  (with the RMSNorm correction for masked hidden channels), for masking at any TP/PP layout.
- ``reshard_state`` slices an engine's state (fp32 masters, Adam moments) for a compaction at
  any TP size, one tensor at a time through its canonical form, and ``reshard_block_hessians``
  re-cuts the per-rank (block-diagonal) OBS Hessians of row-parallel inputs along the new shards.

Gradients fed must be this rank's own (before any data-parallel reduction), and the embedding
gradient of a tied model under PP must already be the sum of both copies (megatron's
finalize_model_grads does this; after a bare pipeline schedule call
``allreduce_tied_embedding_grads_``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import struct
from typing import Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from megatron_effllm.architecture import Architecture
from megatron_effllm import layout
from megatron_effllm.pruning.groups import PrunePlan, PruningError, tensor_axes
from megatron_effllm.pruning.saliency import GradSaliency
from megatron_effllm.pruning.surgery import check_masks, mask_tensor
from megatron_effllm.parallel.runtime import model_parallel_sizes


class DecisionMismatchError(PruningError):
    """Ranks computed different pruning decisions; applying them would corrupt the model."""


# ---------------------------------------------------------------------- feeding
def feed_local_tensors(
    saliency: GradSaliency,
    weights: Mapping[str, torch.Tensor],
    grads: Mapping[str, Optional[torch.Tensor]],
    count: float,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    add_count: Optional[bool] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> None:
    """Add one shard's megatron-named weights and gradients to ``saliency`` (no process group).

    ``grads`` are gradients of the loss averaged over ``count`` samples (as in
    ``GradSaliency.update``); names with a None gradient are skipped. ``add_count`` defaults to
    "this is TP rank 0 of the first stage", the one rank per model replica that counts the batch.
    ``compute_dtype=torch.float64`` forms the per-group sums in float64, which makes them
    independent of the layout up to float64 rounding (the default, float32 for float32 weights,
    sums in an order that depends on the shard); it costs a float64 copy of one tensor at a time.
    """
    arch = saliency.arch
    seen: set[str] = set()
    for name, g in grads.items():
        if g is None or layout.is_extra_state(name):
            continue
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # megatron's last-stage copy of the embedding: the first stage counts it
        w_pieces = layout.canonical_pieces(arch, name, weights[name], layout.ParallelDims(tp_rank, tp_size, pp_rank, pp_size))
        g_pieces = layout.canonical_pieces(arch, name, g, layout.ParallelDims(tp_rank, tp_size, pp_rank, pp_size))
        for canon, (w_piece, off) in w_pieces.items():
            if not off and tp_rank != 0:
                continue  # replicated on every TP rank (norms): counted on TP rank 0
            if canon in seen:
                raise PruningError(f"two megatron tensors of one shard map to {canon}; the model does not "
                                   "follow the megatron GPT layout")
            seen.add(canon)
            g_piece = g_pieces[canon][0]
            if compute_dtype is not None:
                w_piece, g_piece = w_piece.to(compute_dtype), g_piece.to(compute_dtype)
            # One tensor at a time, so at most one tensor's products are alive.
            saliency.update({canon: w_piece}, {canon: g_piece}, count=count, offsets={canon: off},
                            add_count=False)
    if add_count is None:
        add_count = tp_rank == 0 and pp_rank == 0
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
    gradients captured by hooks); the layout comes from megatron's parallel groups. Local: no
    communication. Call ``reduce_saliency`` before deciding. ``count``, ``add_count`` and
    ``compute_dtype`` as in ``feed_local_tensors``.
    """
    tp_rank, tp, pp_rank, pp = model_parallel_sizes()
    weights, local_grads = {}, {}
    for name, p in model.named_parameters():
        weights[name] = p.detach()
        local_grads[name] = grads.get(name) if grads is not None else p.grad
    if all(g is None for g in local_grads.values()):
        # e.g. a wrapper that keeps gradients elsewhere (megatron DDP's main_grad): pass grads=
        raise PruningError("no parameter of this rank has a gradient to score; run backward first or "
                           "pass the gradients as grads={name: tensor}")
    feed_local_tensors(saliency, weights, local_grads, count, tp_rank=tp_rank, tp_size=tp,
                       pp_rank=pp_rank, pp_size=pp, add_count=add_count, compute_dtype=compute_dtype)


def allreduce_tied_embedding_grads_(model: torch.nn.Module) -> None:
    """Sum the gradients of the two copies of a tied embedding (first and last pipeline stage),
    in place, as megatron's finalize_model_grads does; nothing to do without PP or tying.
    Collective over megatron's embedding group: call it on every rank."""
    from megatron.core import parallel_state

    _, _, _, pp = model_parallel_sizes()
    if pp == 1 or not getattr(model, "share_embeddings_and_output_weights", False):
        return
    if not parallel_state.is_rank_in_embedding_group():
        return
    weight = model.shared_embedding_or_output_weight()
    if weight.grad is None:
        raise PruningError("the tied embedding has no gradient on this stage; run a backward pass first")
    dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


# ---------------------------------------------------------------------- reduction
def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_flat(tensors: list[torch.Tensor], groups: Iterable) -> list[torch.Tensor]:
    """Sum ``tensors`` over each group in turn, as one flat buffer per group (one message)."""
    groups = [g for g in groups if g is not None and dist.get_world_size(g) > 1]
    if not groups:
        return [t.clone() for t in tensors]
    dtype = tensors[0].dtype
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors]).to(_comm_device(groups[0]))
    for g in groups:
        dist.all_reduce(flat, group=g)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        start += t.numel()
    return out


def reduce_saliency(
    saliency: GradSaliency, *, model_parallel: bool = True, data_parallel: bool = True
) -> GradSaliency:
    """A copy of ``saliency`` whose state is summed over the TP and PP groups (completing the
    partial, zero-padded per-rank vectors) and over the DP group (every rank's micro-batches).

    Collective: every rank calls it. The running local state is left untouched, so
    accumulation continues and the next reduction counts nothing twice. Without
    torch.distributed or megatron's groups this is a plain copy.
    """
    out = copy.deepcopy(saliency)
    if not dist.is_initialized():
        return out
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        groups = [dist.group.WORLD] if data_parallel else []  # no model parallelism: all ranks are DP
    else:
        if ps.get_context_parallel_world_size() > 1:
            raise PruningError("saliency reduction under context parallelism is not supported; use cp=1")
        groups = []
        if model_parallel:
            groups += [ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()]
        if data_parallel:
            groups.append(ps.get_data_parallel_group())
    keys = sorted(out.state)
    reduced = _all_reduce_flat([out.state[k] for k in keys], groups)
    out.state = dict(zip(keys, reduced))
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


def check_same_decision(decision: Decision, group=None) -> str:
    """Raise ``DecisionMismatchError`` on every rank of ``group`` (default: the world) unless all
    of them hold the same decision; returns its sha256 (hex).

    The 256-bit digest goes through all-reduce MIN and MAX: equal everywhere only if every rank
    has the same digest. On a mismatch the digests are gathered to name who disagrees. Every
    rank must call it (it is collective), with its own decision.
    """
    digest = hashlib.sha256(decision_bytes(decision)).digest()
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return digest.hex()
    words = torch.tensor(struct.unpack(">4q", digest), dtype=torch.int64, device=_comm_device(group))
    lo, hi = words.clone(), words.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if torch.equal(lo, hi):
        return digest.hex()
    gathered = [torch.empty_like(words) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, words, group=group)
    by_digest: dict[str, list[int]] = {}
    for i, w in enumerate(gathered):
        rank = dist.get_global_rank(group, i) if group is not None else i
        by_digest.setdefault(struct.pack(">4q", *w.tolist()).hex()[:12], []).append(rank)
    parts = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {h}"
                      for h, r in sorted(by_digest.items(), key=lambda kv: kv[1]))
    raise DecisionMismatchError(
        f"ranks disagree on the pruning decision (sha256 prefixes {parts}); no weight was changed. "
        "Every rank must select from the same reduced scores (reduce_saliency over DP/TP/PP) with "
        "the same selector and constraints"
    )


# ---------------------------------------------------------------------- masks on shards
def local_weight_masks(
    arch: Architecture,
    masks: Mapping[str, torch.Tensor],
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    style: str = layout.LOCAL,
    device: Optional[torch.device] = None,
) -> dict[str, torch.Tensor]:
    """0/1 tensors, megatron-named for shard (tp_rank, pp_rank), for the weights ``masks`` touch
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

    return {k: m for k, m in layout.iter_megatron(arch, canonical_mask, layout.ParallelDims(tp_rank, tp_size, pp_rank, pp_size), style)
            if not bool(m.all())}


_NORM_MODULES = ("input_layernorm", "pre_mlp_layernorm", "final_layernorm")


def apply_masks_(model: torch.nn.Module, arch: Architecture, masks: Mapping[str, torch.Tensor]) -> list:
    """Zero this rank's masked weight slices in place; when hidden channels are masked, also
    make every RMSNorm take its statistics over the kept channels (returns the hook handles).

    Masked hidden channels are exactly zero in the residual stream (embedding columns and
    o_proj / down_proj rows are zero), so rescaling the norm output by
    sqrt((ss/D + eps) / (ss/D_kept + eps)) gives the physically pruned model's norm. The weights
    are zeroed once: during training re-apply after every optimizer step (or keep their
    gradients at zero).
    """
    from megatron_effllm.model.weights import model_style

    tp_rank, tp, pp_rank, pp = model_parallel_sizes()
    style = model_style(model)
    kept = float(masks["hidden"].sum())
    if kept < arch.hidden_size and style != layout.LOCAL:
        raise PruningError("masking hidden channels needs the local layer spec (TransformerEngine fuses the "
                           "norms into linear_qkv / linear_fc1, where no hook can correct them)")
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device if params else None
    local = local_weight_masks(arch, masks, tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp,
                               style=style, device=device)
    unknown = sorted(set(local) - set(params))
    if unknown:
        raise PruningError(f"the model has no parameters {unknown[:3]}; it was not built for this "
                           "architecture at this layout")
    with torch.no_grad():
        for name, m in local.items():
            params[name].mul_(m.to(device=params[name].device, dtype=params[name].dtype))
    if kept == arch.hidden_size:
        return []
    full = float(arch.hidden_size)

    def norm_hook(module, args, output):
        eps = getattr(module, "eps", None) or arch.rms_norm_eps
        ss = args[0].float().pow(2).sum(-1, keepdim=True)
        scale = torch.sqrt((ss / full + eps) / (ss / kept + eps))
        return (output.float() * scale).to(output.dtype)

    return [module.register_forward_hook(norm_hook) for name, module in model.named_modules()
            if name.endswith(_NORM_MODULES)]


# ---------------------------------------------------------------------- compaction at any TP
def all_reduce_(t: torch.Tensor, group=None, op=None) -> torch.Tensor:
    """In-place all-reduce of ``t`` wherever it lives: through the communication device when the
    backend needs it (NCCL and a CPU tensor), else directly (gloo: exactly ``dist.all_reduce``)."""
    op = dist.ReduceOp.SUM if op is None else op
    device = _comm_device(group)
    if t.device == device:
        dist.all_reduce(t, op=op, group=group)
        return t
    buf = t.to(device)
    dist.all_reduce(buf, op=op, group=group)
    t.copy_(buf)
    return t


def tp_layout() -> tuple[int, int]:
    """(tensor-parallel rank, size) of this process; (0, 1) without megatron's groups."""
    tp_rank, tp, _, _ = model_parallel_sizes()
    return tp_rank, tp


def tp_all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every TP rank's ``t`` (equal shapes), in TP rank order; ``[t]`` at TP=1. Collective
    over the tensor-parallel group."""
    _, tp = tp_layout()
    if tp == 1:
        return [t]
    from megatron.core import parallel_state as ps

    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(out, t, group=ps.get_tensor_model_parallel_group())
    return out


def _renamed(name: str, new_pos: Mapping[int, int], prefix: str) -> Optional[str]:
    """``name`` with its layer number (after ``prefix``) moved to the kept layer's new position;
    None when the layer is removed; unchanged for tensors outside the layers."""
    if not name.startswith(prefix):
        return name
    rest = name[len(prefix):]
    layer, tail = rest.split(".", 1)
    if int(layer) not in new_pos:
        return None
    return f"{prefix}{new_pos[int(layer)]}.{tail}"


def reshard_state(
    arch: Architecture,
    plan: PrunePlan,
    full: dict,
    *,
    fold=None,
) -> dict:
    """Slice an engine's state for a compaction at any TP/PP size, one tensor at a time.

    ``full``: ``{megatron parameter name: {"param" | "exp_avg" | "exp_avg_sq": this TP rank's
    shard}}`` (full over data parallelism, as ``training.engine.gather_full_state`` gives it);
    entries are consumed (popped) as they are done. For each tensor, the TP shards are
    all-gathered, mapped to canonical tensors, sliced by ``plan``, mapped to the new
    architecture's TP layout, and this rank's shard is kept: kept heads and FFN channels need
    not be balanced over the old shards (the global ranking may empty one rank's range more than
    another's), so the new shards take channels from any old one. The transient is one full
    tensor, not the model. ``fold(canonical dict) -> canonical dict`` transforms the gathered
    fp32 masters ("param") before slicing (L0 gate values). Pure data movement otherwise: at
    TP=1 the result is exactly the single-process slicing. Collective over the TP group: every
    rank calls it with the same names. Under PP each stage slices its own layers (layer numbers
    local to the stage); removing layers would move layers between stages and is refused.
    """
    from megatron_effllm.layout import layer_of, layer_prefix
    from megatron_effllm.pruning.groups import tensor_axes
    from megatron_effllm.pruning.surgery import slice_tensor

    tp_rank, tp, pp_rank, pp = model_parallel_sizes()
    if pp != 1 and len(plan.kept_layers) != arch.num_layers:
        raise PruningError("removing layers under pipeline parallelism would move layers between stages; "
                           "set prune.allow_depth=false or parallel.pp=1")
    new_arch = plan.after
    axes = tensor_axes(arch)
    new_pos = {old: new for new, old in enumerate(plan.kept_layers)}
    out: dict = {}
    for name in sorted(full):
        entry = full.pop(name)
        new_name = _renamed(name, new_pos, "decoder.layers.")
        if new_name is None:  # a removed layer (the same on every rank: nothing to gather)
            continue
        new_entry = {}
        for key in sorted(entry):
            local = entry.pop(key)
            canon = layout.canonical_from_shards(arch, name, tp_all_gather(local), pp_rank, pp)
            del local
            if fold is not None and key == "param":
                canon = fold(canon)
            sliced = {}
            for c, t in canon.items():
                l = layer_of(c)
                new_c = c if l is None else layer_prefix(new_pos[l]) + c[len(layer_prefix(l)):]
                sliced[new_c] = slice_tensor(t, axes[c], plan).contiguous()
            del canon
            new_entry[key] = layout.megatron_tensor(new_arch, new_name, sliced, layout.ParallelDims(tp_rank, tp, pp_rank, pp))
        out[new_name] = new_entry
    return out


def reshard_block_hessians(state: Mapping[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """``obs.HessianAccumulator`` state of row-parallel inputs (o_proj / down_proj columns held by
    this TP rank) after a compaction by ``plan``: the block-diagonal Hessian over the kept
    columns, cut along the new shards.

    Each rank holds X^T X of its own columns only (the block-diagonal approximation: a full-width
    Hessian would cost O(width^2) per rank and an all-gather of activations every step). The old
    blocks are all-gathered, laid on the diagonal, sliced by the kept columns and cut at the new
    shard boundaries: entries between columns that came from different old ranks are zero, as
    they were in the approximation. One layer's full matrix at a time. Collective over TP.
    """
    from megatron_effllm.layout import layer_prefix
    from megatron_effllm.pruning.groups import expand_units, tensor_axes

    tp_rank, tp = tp_layout()
    axes = tensor_axes(plan.before)
    new_pos = {old: new for new, old in enumerate(plan.kept_layers)}
    out: dict[str, torch.Tensor] = {}
    for key in sorted(k for k in state if k.startswith("xtx.")):
        name = key[4:]
        ax = axes[name][1]
        if ax.layer not in new_pos:
            continue
        blocks = tp_all_gather(state[key])
        full = torch.block_diag(*blocks)
        del blocks
        idx = expand_units(plan.kept(ax.kind, ax.layer), ax.unit).to(full.device)
        full = full.index_select(0, idx).index_select(1, idx)
        n = full.shape[0] // tp
        new = layer_prefix(new_pos[ax.layer]) + name[len(layer_prefix(ax.layer)):]
        out[f"xtx.{new}"] = full[tp_rank * n:(tp_rank + 1) * n, tp_rank * n:(tp_rank + 1) * n].clone()
        out[f"n.{new}"] = state[f"n.{name}"].clone()
    return out
