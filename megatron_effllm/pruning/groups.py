"""Minimal parameter groups of a Llama-family decoder, what each owns, and what it costs.

A group is the smallest set of parameter slices that must go together for the network to stay
well-formed. Everything in the pruning package reads one table, ``tensor_axes``: for every
canonical tensor (HF Llama names, ``layout.canonical``) and every dimension, which group kind
indexes that dimension (derived from the canonical table's dimension symbols). Masking,
slicing and saliency reductions are derived from it; the costs from the one parameter count,
``Architecture.count_params``.

Group kinds (``layer`` is the position in ``arch.layers``):

- ``head``   query head h of a layer: q_proj rows [h*d, (h+1)*d) (+ their q bias), o_proj columns.
- ``kv``     KV group g of a layer: k_proj/v_proj rows [g*d, (g+1)*d) (+ biases). Removing a KV
             group also removes every query head that reads it (heads g*hpg .. g*hpg+hpg-1); the
             cost of the removable unit counts them (``kv_cost``), the saliency vectors score the
             k/v rows alone ("own") and the heads separately.
- ``ffn``    FFN channel c: gate_proj and up_proj row c, down_proj column c.
- ``hidden`` stem channel d: embedding column, every norm entry, every q/k/v/gate/up column,
             every o/down row, lm_head column, in all layers at once. Tied embeddings stay tied:
             lm_head is absent from the canonical dict, the shared embedding is sliced once.
- ``layer``  a whole block (depth pruning).

GQA: HF and megatron need the same number of query heads per KV group in a layer. Query heads
are therefore never removed one by one: the selectable unit is *one head from every KV group of
the layer* (each group gives up its own least salient head), so heads_per_group drops by one and
stays equal across groups. Whole KV groups go with all their heads. Under tensor parallelism of
degree t, KV groups go t at a time (heads follow automatically, since heads = kv * hpg).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm.errors import UserError
from megatron_effllm.layout import canonical

GROUP_KINDS = ("head", "kv", "ffn", "hidden")


class PruningError(UserError):
    """An impossible pruning request (inconsistent indices, unreachable budget, bad scores)."""


@dataclass(frozen=True)
class Axis:
    """A tensor dimension indexed by groups of one kind: ``unit`` consecutive entries per group."""

    kind: str
    layer: Optional[int]  # layer position; None for hidden channels
    unit: int


def tensor_axes(arch: Architecture) -> dict[str, tuple[Optional[Axis], ...]]:
    """Every canonical tensor name -> one Axis (or None) per dimension, in canonical order:
    the dimension symbols of ``layout.canonical`` are the group kinds (vocab rows: None)."""
    units = {canonical.HEAD: arch.head_dim, canonical.KV: arch.head_dim, canonical.FFN: 1, canonical.HIDDEN: 1}
    return {
        name: tuple(
            None if d not in units else Axis(d, None if d == canonical.HIDDEN else layer, units[d]) for d in dims
        )
        for name, dims, layer in canonical.iter_tensors(arch)
    }


# ---------------------------------------------------------------------- ownership
def expand_units(index: torch.Tensor, unit: int) -> torch.Tensor:
    """Group indices -> element indices along a dimension (``unit`` consecutive entries each)."""
    index = torch.as_tensor(index, dtype=torch.long)
    if unit == 1:
        return index
    return (index[:, None] * unit + torch.arange(unit)).reshape(-1)


def heads_of_kv(arch: Architecture, layer: int, kv_groups: Iterable[int]) -> torch.Tensor:
    """Query heads that read the given KV groups (HF grouping: head j reads group j // hpg)."""
    hpg = arch.layers[layer].heads_per_group
    g = torch.as_tensor(list(kv_groups), dtype=torch.long)
    return (g[:, None] * hpg + torch.arange(hpg)).reshape(-1)


def owned_slices(
    arch: Architecture, kind: str, layer: Optional[int], index: Iterable[int]
) -> list[tuple[str, int, torch.Tensor]]:
    """(tensor name, dim, element indices) for every slice owned by groups ``index`` of ``kind``.

    ``kind='kv'`` includes the query heads reading those groups; ``kind='layer'`` lists every
    tensor of the layers with full index ranges.
    """
    index = torch.as_tensor(list(index), dtype=torch.long)
    out = []
    axes_table = tensor_axes(arch)
    if kind == "layer":
        shapes = canonical.canonical_shapes(arch)
        for name, axes in axes_table.items():
            if canonical.layer_of(name) in set(index.tolist()):
                out.append((name, 0, torch.arange(shapes[name][0])))
        return out
    wanted = {kind: index}
    if kind == "kv":
        wanted["head"] = heads_of_kv(arch, layer, index.tolist())
    for name, axes in axes_table.items():
        for dim, ax in enumerate(axes):
            if ax is not None and ax.kind in wanted and ax.layer == layer:
                out.append((name, dim, expand_units(wanted[ax.kind], ax.unit)))
    return out


def owned_param_count(arch: Architecture, kind: str, layer: Optional[int], index: Iterable[int]) -> int:
    """Number of distinct parameters the groups own (overlaps between dims counted once)."""
    shapes = canonical.canonical_shapes(arch)
    per_tensor: dict[str, dict[int, torch.Tensor]] = {}
    for name, dim, idx in owned_slices(arch, kind, layer, index):
        per_tensor.setdefault(name, {})[dim] = idx
    total = 0
    for name, dims in per_tensor.items():
        shape = shapes[name]
        mask = torch.zeros(shape, dtype=torch.bool)
        for dim, idx in dims.items():
            mask.index_fill_(dim, idx, True)
        total += int(mask.sum())
    return total


# ---------------------------------------------------------------------- costs
# Each cost is what the one parameter count (``Architecture.count_params``) loses with one group:
# the count is linear in every width, so that is a difference of two counts.
def _block_step(arch: Architecture, heads: int = 0, kv: int = 0, ffn: int = 0) -> int:
    return arch.layer_params(LayerShape(heads, kv, ffn, 0)) - arch.layer_params(LayerShape(0, 0, 0, 0))


def head_cost(arch: Architecture) -> int:
    """Parameters of one query head: its q rows (+bias) and o columns."""
    return _block_step(arch, heads=1)


def kv_own_cost(arch: Architecture) -> int:
    """Parameters of one KV group's own k/v rows (+biases), without its query heads."""
    return _block_step(arch, kv=1)


def kv_cost(arch: Architecture, layer: int, heads_per_group: Optional[int] = None) -> int:
    """Parameters removed with one KV group: its k/v rows and the query heads that read it."""
    hpg = arch.layers[layer].heads_per_group if heads_per_group is None else heads_per_group
    return kv_own_cost(arch) + hpg * head_cost(arch)


def ffn_cost(arch: Architecture) -> int:
    """Parameters of one FFN channel: gate and up rows, down column."""
    return _block_step(arch, ffn=1)


def hidden_cost(arch: Architecture, layers: Optional[Iterable[LayerShape]] = None) -> int:
    """Parameters of one hidden channel across the whole model (tied embedding counted once)."""
    widths = [l.widths for l in (arch.layers if layers is None else layers)]
    return arch.count_params(1, widths) - arch.count_params(0, widths)


def layer_cost(arch: Architecture, layer: int) -> int:
    return arch.layer_params(arch.layers[layer])


def group_cost(arch: Architecture, kind: str, layer: Optional[int] = None) -> int:
    """Parameters removed with one group of ``kind`` (a KV group with its query heads)."""
    if kind == "head":
        return head_cost(arch)
    if kind == "kv":
        return kv_cost(arch, layer)
    if kind == "ffn":
        return ffn_cost(arch)
    if kind == "hidden":
        return hidden_cost(arch)
    if kind == "layer":
        return layer_cost(arch, layer)
    raise PruningError(f"unknown group kind {kind!r}; use one of head, kv, ffn, hidden, layer")


# ---------------------------------------------------------------------- the result of a selection
@dataclass
class PrunePlan:
    """Which groups survive a prune, in the numbering of ``before``.

    ``heads[l]``, ``kv[l]``, ``ffn[l]`` are keyed by the old layer position of each kept layer and
    hold ascending kept indices; kept heads are group-major, so new head j reads new group
    j // hpg as HF requires. ``hidden`` holds the kept stem channels. ``after`` is the new
    Architecture (kept layers keep their ``source_index``).
    """

    before: Architecture
    after: Architecture
    kept_layers: tuple[int, ...]
    heads: dict[int, torch.Tensor]
    kv: dict[int, torch.Tensor]
    ffn: dict[int, torch.Tensor]
    hidden: torch.Tensor

    @classmethod
    def build(
        cls,
        before: Architecture,
        kept_layers: Iterable[int],
        heads: dict[int, Iterable[int]],
        kv: dict[int, Iterable[int]],
        ffn: dict[int, Iterable[int]],
        hidden: Iterable[int],
    ) -> "PrunePlan":
        """Check the kept indices, derive the new Architecture."""
        kept_layers = tuple(int(l) for l in kept_layers)
        if list(kept_layers) != sorted(set(kept_layers)) or not kept_layers:
            raise PruningError(f"kept layers {kept_layers} must be ascending, unique and non-empty")
        if kept_layers[-1] >= before.num_layers or kept_layers[0] < 0:
            raise PruningError(f"kept layers {kept_layers} out of range for {before.num_layers} layers")

        def idx(values, n, what):
            t = torch.as_tensor(list(values), dtype=torch.long)
            if t.numel() == 0 or (t.numel() > 1 and not bool((t[1:] > t[:-1]).all())):
                raise PruningError(f"{what}: kept indices must be ascending, unique and non-empty")
            if int(t[0]) < 0 or int(t[-1]) >= n:
                raise PruningError(f"{what}: kept indices out of range 0..{n - 1}")
            return t

        hid = idx(hidden, before.hidden_size, "hidden channels")
        new_layers, H, K, F = [], {}, {}, {}
        for l in kept_layers:
            shape = before.layers[l]
            K[l] = idx(kv[l], shape.num_kv_groups, f"layer {l} KV groups")
            H[l] = idx(heads[l], shape.num_heads, f"layer {l} query heads")
            F[l] = idx(ffn[l], shape.ffn_hidden_size, f"layer {l} FFN channels")
            groups = H[l] // shape.heads_per_group
            if not torch.equal(torch.unique(groups), K[l]):
                raise PruningError(
                    f"layer {l}: kept query heads read KV groups {torch.unique(groups).tolist()}, "
                    f"but the kept KV groups are {K[l].tolist()}; a head goes with its group"
                )
            counts = torch.bincount(groups, minlength=shape.num_kv_groups)[K[l]]
            if not bool((counts == counts[0]).all()):
                raise PruningError(
                    f"layer {l}: kept heads per KV group {counts.tolist()} differ; GQA needs the same "
                    "count in every group"
                )
            new_layers.append(LayerShape(len(H[l]), len(K[l]), len(F[l]), shape.source_index))
        after = before.replace(hidden_size=len(hid), layers=tuple(new_layers))
        return cls(before, after, kept_layers, H, K, F, hid)

    @classmethod
    def identity(cls, arch: Architecture) -> "PrunePlan":
        L = range(arch.num_layers)
        return cls.build(
            arch,
            L,
            {l: range(arch.layers[l].num_heads) for l in L},
            {l: range(arch.layers[l].num_kv_groups) for l in L},
            {l: range(arch.layers[l].ffn_hidden_size) for l in L},
            range(arch.hidden_size),
        )

    def kept(self, kind: str, layer: Optional[int] = None) -> torch.Tensor:
        """Kept indices of ``kind`` (old numbering); ``layer`` is an old layer position."""
        if kind == "hidden":
            return self.hidden
        if kind == "layer":
            return torch.as_tensor(self.kept_layers, dtype=torch.long)
        return {"head": self.heads, "kv": self.kv, "ffn": self.ffn}[kind][layer]

    @property
    def is_identity(self) -> bool:
        return self.after == self.before

    def removed_params(self) -> int:
        return self.before.num_params() - self.after.num_params()

    def to_dict(self) -> dict:
        """JSON-friendly record (for checkpoints and logs)."""
        return {
            "before": self.before.to_dict(),
            "kept_layers": list(self.kept_layers),
            "heads": {str(l): v.tolist() for l, v in self.heads.items()},
            "kv": {str(l): v.tolist() for l, v in self.kv.items()},
            "ffn": {str(l): v.tolist() for l, v in self.ffn.items()},
            "hidden": self.hidden.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        before = Architecture.from_dict(d["before"])
        as_int = lambda m: {int(k): v for k, v in m.items()}  # noqa: E731
        return cls.build(before, d["kept_layers"], as_int(d["heads"]), as_int(d["kv"]), as_int(d["ffn"]), d["hidden"])
