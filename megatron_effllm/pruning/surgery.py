"""Masking (soft, reversible) and physical removal of parameter groups on canonical tensors.

Masks are a plain dict of 0/1 vectors over the groups of the *current* architecture:
``head.{l}`` [heads_l], ``kv.{l}`` [kv_l], ``ffn.{l}`` [ffn_l], ``hidden`` [hidden], ``layer``
[num_layers]. A zero KV-group entry also masks every head reading it; a zero layer entry masks
the whole block (its o_proj and down_proj outputs become zero, so the block is the identity).

Masking weights alone is exact for heads, KV groups, FFN channels and layers. For hidden
channels the RMSNorm statistics must also ignore the masked channels (the mean of x^2 runs over
the kept channels only, as after physical removal): use ``masked_rms_norm`` in the forward,
e.g. through ``hooks.install_mask_hooks``.

Physical removal (``slice_state_dict``) slices every tensor of the canonical dict, or of any
dict shaped like it (Adam moments, fp32 master weights), and renumbers the kept layers.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.layout import check_state_dict, layer_of, renumber
from megatron_effllm.pruning.groups import PrunePlan, PruningError, expand_units, tensor_axes


# ---------------------------------------------------------------------- masks
def full_masks(arch: Architecture, dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
    """All-ones masks (nothing masked) for ``arch``."""
    m = {"hidden": torch.ones(arch.hidden_size, dtype=dtype, device=device),
         "layer": torch.ones(arch.num_layers, dtype=dtype, device=device)}
    for l, shape in enumerate(arch.layers):
        m[f"head.{l}"] = torch.ones(shape.num_heads, dtype=dtype, device=device)
        m[f"kv.{l}"] = torch.ones(shape.num_kv_groups, dtype=dtype, device=device)
        m[f"ffn.{l}"] = torch.ones(shape.ffn_hidden_size, dtype=dtype, device=device)
    return m


def masks_from_plan(plan: PrunePlan, dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
    """Masks over ``plan.before`` that zero exactly what the plan removes."""
    m = {k: torch.zeros_like(v) for k, v in full_masks(plan.before, dtype, device).items()}
    m["hidden"][plan.hidden.to(m["hidden"].device)] = 1
    for l in plan.kept_layers:
        m["layer"][l] = 1
        for kind, kept in (("head", plan.heads[l]), ("kv", plan.kv[l]), ("ffn", plan.ffn[l])):
            m[f"{kind}.{l}"][kept.to(m[f"{kind}.{l}"].device)] = 1
    # Groups of removed layers stay 1: the layer mask alone removes them, and un-masking the
    # layer later restores the block whole.
    for l in range(plan.before.num_layers):
        if l not in plan.kept_layers:
            for kind in ("head", "kv", "ffn"):
                m[f"{kind}.{l}"].fill_(1)
    return m


def effective_head_mask(arch: Architecture, masks: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """Query-head mask of a layer including the masks of the KV groups the heads read."""
    hpg = arch.layers[layer].heads_per_group
    return masks[f"head.{layer}"] * masks[f"kv.{layer}"].repeat_interleave(hpg)


def check_masks(arch: Architecture, masks: dict[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in full_masks(arch, device="meta").items()}
    for k, shape in expected.items():
        if k not in masks or tuple(masks[k].shape) != shape:
            got = None if k not in masks else tuple(masks[k].shape)
            raise PruningError(f"mask {k!r} should have shape {shape}, got {got}; build masks with full_masks(arch)")


def plan_from_masks(arch: Architecture, masks: dict[str, torch.Tensor]) -> PrunePlan:
    """The physical removal that a mask dict describes (raises if it breaks GQA equality)."""
    check_masks(arch, masks)
    nz = lambda v: torch.nonzero(v.detach().cpu() != 0).flatten()  # noqa: E731
    kept_layers = nz(masks["layer"]).tolist()
    heads, kv, ffn = {}, {}, {}
    for l in kept_layers:
        kv[l] = nz(masks[f"kv.{l}"])
        heads[l] = nz(effective_head_mask(arch, masks, l))
        ffn[l] = nz(masks[f"ffn.{l}"])
    return PrunePlan.build(arch, kept_layers, heads, kv, ffn, nz(masks["hidden"]))


def _dim_mask(arch: Architecture, masks: dict[str, torch.Tensor], ax) -> torch.Tensor:
    if ax.kind == "hidden":
        v = masks["hidden"]
    elif ax.kind == "head":
        v = effective_head_mask(arch, masks, ax.layer)
    else:
        v = masks[f"{ax.kind}.{ax.layer}"]
    return v.repeat_interleave(ax.unit) if ax.unit > 1 else v


def mask_state_dict(
    tensors: dict[str, torch.Tensor], arch: Architecture, masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A copy of ``tensors`` (canonical dict or a dict shaped like it) with masked slices zeroed."""
    check_state_dict(arch, tensors)
    check_masks(arch, masks)
    out = {}
    for name, axes in tensor_axes(arch).items():
        t = mask_tensor(name, tensors[name], arch, masks, axes)
        out[name] = t if t is not tensors[name] else t.clone()
    return out


def mask_tensor(name: str, t: torch.Tensor, arch: Architecture, masks: dict[str, torch.Tensor],
                axes: Optional[tuple] = None) -> torch.Tensor:
    """Canonical tensor ``name`` with its masked slices zeroed (``t`` itself when no mask touches
    it). ``axes``: its entry of ``tensor_axes(arch)``, when the caller already has them."""
    axes = tensor_axes(arch)[name] if axes is None else axes
    for dim, ax in enumerate(axes):
        if ax is None:
            continue
        m = _dim_mask(arch, masks, ax)
        if bool(m.all()):
            continue
        shape = [1] * t.dim()
        shape[dim] = -1
        t = t * m.to(device=t.device, dtype=t.dtype).view(shape)
    l = layer_of(name)
    if l is not None and not bool(masks["layer"][l]):
        t = t * masks["layer"][l].to(device=t.device, dtype=t.dtype)
    return t


def masked_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, hidden_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """RMSNorm whose statistics run over the kept hidden channels only (HF arithmetic: fp32 stats).

    With masked channels zero in ``x`` and in ``weight`` this equals the RMSNorm of the
    physically pruned model on the kept channels (and zero elsewhere).
    """
    dtype = x.dtype
    h = x.to(torch.float32)
    if hidden_mask is None:
        var = h.pow(2).mean(-1, keepdim=True)
    else:
        m = hidden_mask.to(device=h.device, dtype=torch.float32)
        var = (h.pow(2) * m).sum(-1, keepdim=True) / m.sum()
        h = h * m
    return weight * (h * torch.rsqrt(var + eps)).to(dtype)


def norm_eps(module: torch.nn.Module, default: float) -> float:
    """The epsilon of an RMSNorm module (HF: ``variance_epsilon``; torch / megatron: ``eps``),
    else ``default`` (the architecture's ``rms_norm_eps``)."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    return default if eps is None else eps


def rescale_to_kept(x: torch.Tensor, output: torch.Tensor, eps: float, kept) -> torch.Tensor:
    """An RMSNorm's ``output`` for input ``x`` whose masked hidden channels are exactly zero,
    rescaled so that its statistics run over the ``kept`` channels only (as after their
    removal): sqrt((ss/D + eps) / (ss/D_kept + eps)), one sum of squares serving both means.
    ``kept`` is a number or a 0-d tensor (the count of open L0 gates)."""
    return (output.float() * kept_norm_scale(x, eps, kept)).to(output.dtype)


def kept_norm_scale(x: torch.Tensor, eps: float, kept) -> torch.Tensor:
    """Per token, the factor ``rescale_to_kept`` applies: sqrt((ss/D + eps) / (ss/D_kept + eps)).
    A norm fused into the linear after it (TransformerEngine's LayerNormLinear) takes it on the
    linear's output less its bias (the factor commutes with the matmul)."""
    ss = x.float().pow(2).sum(-1, keepdim=True)
    return torch.sqrt((ss / x.shape[-1] + eps) / (ss / kept + eps))


# ---------------------------------------------------------------------- physical removal
def slice_tensor(t: torch.Tensor, axes, plan: PrunePlan) -> torch.Tensor:
    """Slice one tensor shaped like a canonical tensor of ``plan.before`` (axes from tensor_axes)."""
    for dim, ax in enumerate(axes):
        if ax is None:
            continue
        kept = plan.kept(ax.kind, ax.layer)
        t = t.index_select(dim, expand_units(kept, ax.unit).to(t.device))
    return t


def slice_state_dict(
    tensors: dict[str, torch.Tensor], plan: PrunePlan, *, unknown: str = "error"
) -> dict[str, torch.Tensor]:
    """Physically remove what ``plan`` removes from a canonical (or canonically shaped) dict.

    Kept layers are renamed to their new positions. ``unknown='keep'`` passes through tensors
    with non-canonical names unchanged (e.g. an optimizer's scalar step counts); the default
    rejects them, since an unsliced tensor would silently break later.
    """
    if unknown not in ("error", "keep"):
        raise PruningError(f"unknown={unknown!r}: use 'error' or 'keep'")
    axes_table = tensor_axes(plan.before)
    canonical = {k: v for k, v in tensors.items() if k in axes_table}
    rest = {k: v for k, v in tensors.items() if k not in axes_table}
    if rest and unknown == "error":
        raise PruningError(
            f"tensors with non-canonical names {sorted(rest)[:3]}; rename them to the HF names "
            "or pass unknown='keep'"
        )
    check_state_dict(plan.before, canonical)
    new_pos = {old: new for new, old in enumerate(plan.kept_layers)}
    out = {}
    for name, axes in axes_table.items():
        l = layer_of(name)
        if l is not None and l not in new_pos:
            continue
        out[renumber(name, new_pos)] = slice_tensor(canonical[name], axes, plan).contiguous()
    out.update(rest)
    return out


def slice_group_vectors(vectors: dict[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Slice per-group vectors keyed ``<prefix>.<kind>.<layer>`` / ``<prefix>.hidden`` / ``<prefix>.layer``.

    Used for mask dicts and saliency accumulators, so running statistics survive a prune.
    Keys without a group suffix (counts) pass through.
    """
    new_pos = {old: new for new, old in enumerate(plan.kept_layers)}
    out = {}
    for key, v in vectors.items():
        parts = key.split(".")
        if parts[-1] == "hidden" or (len(parts) == 1 and parts[0] == "hidden"):
            out[key] = v.index_select(0, plan.hidden.to(v.device))
        elif parts[-1] == "layer":
            out[key] = v.index_select(0, torch.as_tensor(plan.kept_layers, device=v.device))
        elif len(parts) >= 2 and parts[-2] in ("head", "kv", "ffn") and parts[-1].isdigit():
            l = int(parts[-1])
            if l in new_pos:
                kept = plan.kept(parts[-2], l).to(v.device)
                out[".".join(parts[:-1] + [str(new_pos[l])])] = v.index_select(0, kept)
        else:
            out[key] = v
    return out
