"""Saliency statistics: running sums over canonical tensors, and the group scores made from them.

The accumulators here (``GradSaliency`` from (weight, grad) pairs, ``ActivationSaliency`` from
forward hooks) keep what the estimators in ``pruning/estimators/`` ask for; an estimator (one
file each, registered in ``registry.ESTIMATORS``) turns the sums into ``GroupScores``, one score
per parameter group, larger = more important.

The state is a plain dict of tensors holding *sums* (contributions weighted by the number of
samples each gradient averages over, plus the total count), so summing the states of
data-parallel ranks gives exactly the state of one process that saw all their micro-batches; an
EMA across steps is ``decay_`` followed by more updates (linear, so it commutes with that sum).

Only per-group reductions are stored (row and column sums of the element-wise products, one
float per group), never weight-sized tensors: the state is tiny, cheap to all-reduce, and can be
sliced with the weights after a prune (``apply_plan``).

Tensor-parallel shards: ``add_elementwise(..., offsets={dim: start})`` places a shard's
reductions at its position in the canonical tensor; summing the states of the TP ranks completes
the partial sums. A tensor replicated on every TP rank (norms) must be fed on one rank only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.layout import layer_of
from megatron_effllm.pruning.groups import PrunePlan, PruningError, tensor_axes
from megatron_effllm.pruning.registry import ESTIMATORS
from megatron_effllm.pruning.surgery import slice_group_vectors

# The gradient quantities an estimator may ask for, each an element-wise function of w * g * n.
GRAD_QUANTITIES = {"wg": lambda wg: wg, "awg": torch.abs, "w2g2": torch.square}


def elementwise(quantity: str, wg: torch.Tensor) -> torch.Tensor:
    """The element-wise term of a gradient quantity from w * g (* count)."""
    return GRAD_QUANTITIES[quantity](wg)


def gradient_estimator(name: str):
    """The registered estimator ``name``, which must score from gradient sums."""
    est = ESTIMATORS.get(name)
    if not est.gradient:
        raise PruningError(f"estimator {name!r} does not score from gradients; use one of "
                           f"{', '.join(ESTIMATORS.names(gradient=True))}")
    return est


@dataclass
class GroupScores:
    """One score per group (larger = more important) for the groups of ``arch``.

    ``kv[l]`` scores a KV group's own k/v rows; removing the group also removes its heads, whose
    scores are in ``heads[l]`` (selectors add them). ``layers`` scores removing a whole block.
    A field set to None means the estimator does not score that kind: selectors will not prune it.
    """

    arch: Architecture
    heads: Optional[list[torch.Tensor]] = None
    kv: Optional[list[torch.Tensor]] = None
    ffn: Optional[list[torch.Tensor]] = None
    hidden: Optional[torch.Tensor] = None
    layers: Optional[torch.Tensor] = None

    def __post_init__(self):
        a = self.arch
        for kind, vecs, sizes in (
            ("heads", self.heads, [l.num_heads for l in a.layers]),
            ("kv", self.kv, [l.num_kv_groups for l in a.layers]),
            ("ffn", self.ffn, [l.ffn_hidden_size for l in a.layers]),
        ):
            if vecs is None:
                continue
            if len(vecs) != a.num_layers or [int(v.numel()) for v in vecs] != sizes:
                raise PruningError(f"{kind} scores do not match the architecture's widths {sizes}")
        if self.hidden is not None and self.hidden.numel() != a.hidden_size:
            raise PruningError(f"hidden scores have {self.hidden.numel()} entries, hidden size is {a.hidden_size}")
        if self.layers is not None and self.layers.numel() != a.num_layers:
            raise PruningError(f"layer scores have {self.layers.numel()} entries for {a.num_layers} layers")
        for v in self._all():
            if not bool(torch.isfinite(v).all()):
                raise PruningError("saliency scores contain NaN or inf; check the gradients / calibration data")

    def _all(self) -> list[torch.Tensor]:
        out = []
        for vecs in (self.heads, self.kv, self.ffn):
            out += list(vecs or [])
        return out + [v for v in (self.hidden, self.layers) if v is not None]

    def to(self, device=None, dtype=torch.float64) -> "GroupScores":
        f = lambda v: None if v is None else v.detach().to(device=device, dtype=dtype)  # noqa: E731
        g = lambda vs: None if vs is None else [f(v) for v in vs]  # noqa: E731
        return GroupScores(self.arch, g(self.heads), g(self.kv), g(self.ffn), f(self.hidden), f(self.layers))


# ---------------------------------------------------------------------- shared reduction
def zero_vectors(arch: Architecture, prefix: str, dtype, device) -> dict[str, torch.Tensor]:
    z = lambda n: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
    out = {f"{prefix}.hidden": z(arch.hidden_size), f"{prefix}.layer": z(arch.num_layers)}
    for l, s in enumerate(arch.layers):
        out[f"{prefix}.head.{l}"] = z(s.num_heads)
        out[f"{prefix}.kv.{l}"] = z(s.num_kv_groups)
        out[f"{prefix}.ffn.{l}"] = z(s.ffn_hidden_size)
    return out


def reduce_to_groups(
    axes_table: dict,
    name: str,
    t: torch.Tensor,
    out: dict[str, torch.Tensor],
    prefix: str,
    offsets: Optional[dict[int, int]] = None,
) -> None:
    """Add the per-group sums of the element-wise quantity ``t`` (tensor ``name``) into ``out``.

    For every dimension owned by a group kind, sums over the other dimensions and over the
    group's ``unit`` entries; also adds the total to the layer's entry of ``<prefix>.layer``.
    ``offsets[dim]`` is where a shard starts in the canonical tensor (TP-local tensors).
    """
    axes = axes_table.get(name)
    if axes is None:
        raise PruningError(f"{name!r} is not a canonical tensor of this architecture")
    if len(axes) != t.dim():
        raise PruningError(f"{name}: expected {len(axes)} dims, got shape {tuple(t.shape)}")
    offsets = offsets or {}
    for dim, ax in enumerate(axes):
        if ax is None:
            continue
        other = [d for d in range(t.dim()) if d != dim]
        v = t.sum(dim=other) if other else t
        if ax.unit > 1:
            v = v.reshape(-1, ax.unit).sum(1)
        start = offsets.get(dim, 0)
        if start % ax.unit:
            raise PruningError(f"{name}: shard offset {start} on dim {dim} is not a multiple of {ax.unit}")
        key = f"{prefix}.hidden" if ax.kind == "hidden" else f"{prefix}.{ax.kind}.{ax.layer}"
        dst = out[key]
        dst[start // ax.unit : start // ax.unit + v.numel()] += v.to(device=dst.device, dtype=dst.dtype)
    l = layer_of(name)
    if l is not None:
        out[f"{prefix}.layer"][l] += t.sum().to(device=out[f"{prefix}.layer"].device, dtype=out[f"{prefix}.layer"].dtype)


def scores_from(arch: Architecture, get: Callable[[str], torch.Tensor], with_layers=True) -> GroupScores:
    L = range(arch.num_layers)
    return GroupScores(
        arch,
        heads=[get(f"head.{l}") for l in L],
        kv=[get(f"kv.{l}") for l in L],
        ffn=[get(f"ffn.{l}") for l in L],
        hidden=get("hidden"),
        layers=get("layer") if with_layers else None,
    )


# ---------------------------------------------------------------------- gradient statistics
class GradSaliency:
    """Accumulates w*g, |w*g| and w^2 (n g)^2 per group from (weight, grad) pairs.

    ``update(weights, grads, count)``: ``grads`` are gradients of the loss averaged over
    ``count`` samples (so ``count * g`` is the gradient of the summed loss). With count=1 per
    sample, the Fisher term is exactly the per-sample empirical Fisher; with micro-batch
    gradients, ``(count * g)^2 / count`` estimates it (the micro-batch gradient's variance is F/n).
    """

    def __init__(
        self,
        arch: Architecture,
        estimators: Optional[Iterable[str]] = None,
        dtype=torch.float64,
        device=None,
    ):
        """Keeps what ``estimators`` need (default: every gradient estimator's quantities)."""
        names = ESTIMATORS.names(gradient=True) if estimators is None else tuple(estimators)
        self.arch = arch
        self.quantities = tuple(sorted({q for e in names for q in gradient_estimator(e).needs}))
        self._axes = tensor_axes(arch)
        self.state: dict[str, torch.Tensor] = {"count": torch.zeros((), dtype=dtype, device=device)}
        for q in self.quantities:
            self.state.update(zero_vectors(arch, q, dtype, device))

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(
        self,
        weights: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        count: float = 1.0,
        offsets: Optional[dict[str, dict[int, int]]] = None,
        add_count: bool = True,
    ) -> None:
        """Add one gradient's contribution; names absent from ``grads`` are skipped.

        ``offsets[name] = {dim: start}`` places a tensor-parallel shard in its canonical tensor.
        Ranks that share one batch (tensor/pipeline parallel) split the tensors between them,
        and only one of them counts the batch: the others pass ``add_count=False``.
        """
        for name, g in grads.items():
            if g is None:
                continue
            w = weights[name]
            off = (offsets or {}).get(name)
            dt = torch.promote_types(torch.promote_types(w.dtype, g.dtype), torch.float32)  # bf16 -> fp32
            wg = w.to(dt) * g.to(dt) * count
            for q in self.quantities:
                self.add_elementwise(q, name, elementwise(q, wg), off)
        if add_count:
            self.add_count(count)

    def add_elementwise(self, quantity: str, name: str, t: torch.Tensor, offsets=None) -> None:
        """Low level: add an already formed element-wise quantity (e.g. a TP shard of w*g*n)."""
        if quantity not in self.quantities:
            raise PruningError(f"quantity {quantity!r} is not accumulated here ({self.quantities})")
        reduce_to_groups(self._axes, name, t, self.state, quantity, offsets)

    def add_count(self, count: float) -> None:
        self.state["count"] += count

    def decay_(self, factor: float) -> None:
        """Scale everything (sums and count) by ``factor``: one step of an EMA."""
        for v in self.state.values():
            v.mul_(factor)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.state):
            raise PruningError("saliency state keys do not match this accumulator; was it saved for another architecture?")
        for k, v in state.items():
            if v.shape != self.state[k].shape:
                raise PruningError(f"saliency state {k}: shape {tuple(v.shape)} != {tuple(self.state[k].shape)}")
            self.state[k] = v.to(self.state[k])

    def apply_plan(self, plan: PrunePlan) -> None:
        """Slice the running sums like the weights, so accumulation continues after a prune."""
        if plan.before != self.arch:
            raise PruningError("the prune plan was made for another architecture than this accumulator's")
        self.state = slice_group_vectors(self.state, plan)
        self.arch = plan.after
        self._axes = tensor_axes(plan.after)

    # ------------------------------------------------------------------ scores
    def scores(self, estimator: str = "taylor") -> GroupScores:
        """The registered gradient estimator's scores from the sums (per sample)."""
        est = gradient_estimator(estimator)
        missing = [q for q in est.needs if q not in self.quantities]
        if missing:
            raise PruningError(f"estimator {estimator!r} needs {missing}, not accumulated; add it to estimators=")
        n = float(self.state["count"])
        if n <= 0:
            raise PruningError("no gradients accumulated yet; run update() on at least one batch")
        s = self.state
        return scores_from(self.arch, lambda key: est.combine({q: s[f"{q}.{key}"] for q in est.needs}, n))


def merge_states(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum accumulator states (what an all-reduce over data-parallel ranks computes)."""
    states = list(states)
    keys = set(states[0])
    if any(set(s) != keys for s in states):
        raise PruningError("accumulator states have different keys; were they built for the same architecture?")
    return {k: sum(s[k] for s in states) for k in states[0]}


# ---------------------------------------------------------------------- activation statistics
class ActivationSaliency:
    """Minitron activation importance and block cosine similarity, as DP-summable sums.

    Sites fed by forward hooks (``hooks.ActivationRecorder``):
    - ``add_attention_output(l, x)``: input of o_proj [..., heads*d]; per head sum_tokens ||x_h||_2
    - ``add_ffn_activation(l, x)``: input of down_proj [..., ffn]; per channel sum_tokens |x|
    - ``add_norm_output(x)``: any RMSNorm output [..., hidden]; per channel sum_tokens |x|
      (all norms of the model add into the same hidden vector)
    - ``add_block_io(l, x_in, x_out)``: per layer sum_tokens cos(x_in, x_out)
    - ``add_tokens(n)``: once per forward, the number of (unmasked) tokens.
    A token mask [...] (1 = real token) may be passed to every call to ignore padding.
    """

    def __init__(self, arch: Architecture, dtype=torch.float64, device=None):
        self.arch = arch
        z = lambda n: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
        self.state = {"tokens": torch.zeros((), dtype=dtype, device=device), "act.hidden": z(arch.hidden_size),
                      "cos.layer": z(arch.num_layers), "blocks.layer": z(arch.num_layers)}
        for l, s in enumerate(arch.layers):
            self.state[f"act.head.{l}"] = z(s.num_heads)
            self.state[f"act.ffn.{l}"] = z(s.ffn_hidden_size)

    @staticmethod
    def _flat(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x.detach().reshape(-1, x.shape[-1])
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if mask is not None:
            x = x[mask.reshape(-1).to(torch.bool).to(x.device)]
        return x

    def _add(self, key: str, v: torch.Tensor) -> None:
        self.state[key] += v.to(self.state[key])

    @torch.no_grad()
    def add_attention_output(self, layer: int, x: torch.Tensor, mask=None) -> None:
        x = self._flat(x, mask)
        d = self.arch.head_dim
        self._add(f"act.head.{layer}", x.reshape(x.shape[0], -1, d).norm(dim=-1).sum(0))

    @torch.no_grad()
    def add_ffn_activation(self, layer: int, x: torch.Tensor, mask=None) -> None:
        self._add(f"act.ffn.{layer}", self._flat(x, mask).abs().sum(0))

    @torch.no_grad()
    def add_norm_output(self, x: torch.Tensor, mask=None) -> None:
        self._add("act.hidden", self._flat(x, mask).abs().sum(0))

    @torch.no_grad()
    def add_block_io(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor, mask=None) -> None:
        a, b = self._flat(x_in, mask), self._flat(x_out, mask)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
        self.state["cos.layer"][layer] += cos.sum().to(self.state["cos.layer"])
        self.state["blocks.layer"][layer] += cos.numel()

    def add_tokens(self, n: float) -> None:
        self.state["tokens"] += n

    def decay_(self, factor: float) -> None:
        for v in self.state.values():
            v.mul_(factor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.state):
            raise PruningError("activation state keys do not match this accumulator")
        self.state = {k: v.to(self.state[k]) for k, v in state.items()}

    def apply_plan(self, plan: PrunePlan) -> None:
        if plan.before != self.arch:
            raise PruningError("the prune plan was made for another architecture than this accumulator's")
        self.state = slice_group_vectors(self.state, plan)
        self.arch = plan.after

    def layer_cosine(self) -> torch.Tensor:
        """Mean cos(x_in, x_out) of every block over the tokens seen."""
        n = self.state["blocks.layer"]
        if bool((n <= 0).any()):
            raise PruningError("no block inputs/outputs recorded for some layers; run calibration batches first")
        return self.state["cos.layer"] / n

    def layer_importance(self) -> torch.Tensor:
        """Adapt-Pruner layer importance I_l = -mean cos(x_in, x_out) (higher = more important)."""
        return -self.layer_cosine()


def normalise_importance(importance: torch.Tensor) -> torch.Tensor:
    """Map layer importances linearly onto [-1, 1] (all equal -> all zero)."""
    imp = importance.to(torch.float64)
    lo, hi = float(imp.min()), float(imp.max())
    if math.isclose(lo, hi):
        return torch.zeros_like(imp)
    return 2.0 * (imp - lo) / (hi - lo) - 1.0
