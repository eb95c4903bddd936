"""Second-order (OBS) weight update after removing input columns of a linear layer.

For a linear y = W x with calibration inputs X (n tokens), the layer Hessian of the squared
output error is H = 2 X^T X / n; damping adds ``damp * mean(diag H)`` to the diagonal. Removing
input columns P and letting the other columns absorb the loss (SparseGPT/OBS, for column groups):

    delta W = - W[:,P] ((H^-1)[P,P])^-1 (H^-1)[P,:]          (then columns P are exactly zero)
    S_P     = 1/2 tr( W[:,P] ((H^-1)[P,P])^-1 W[:,P]^T )      (= mean_tokens ||delta W x||^2, undamped)

``obs_update`` does this for a given set P at once (block). ``obs_greedy`` chooses the groups
itself, one at a time, each time the group with the smallest S_P under the current H^-1, and
downdates H^-1 exactly (rank-|g|): H^-1 <- H^-1 - H^-1[:,g] (H^-1[g,g])^-1 H^-1[g,:].

Hessians are accumulated by ``HessianAccumulator`` as sums of X^T X and token counts (so the
states of data-parallel ranks add up), keyed by the canonical name of the weight that reads the
input (q_proj for q/k/v, gate_proj for gate/up: they read the same tensor).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.layout import check_state_dict, layer_prefix
from megatron_effllm.pruning.groups import PrunePlan, PruningError, expand_units, tensor_axes
from megatron_effllm.pruning.saliency import GroupScores

# Weights that read the same input as another one share its Hessian.
SHARED_INPUT = {
    "self_attn.k_proj.weight": "self_attn.q_proj.weight",
    "self_attn.v_proj.weight": "self_attn.q_proj.weight",
    "mlp.up_proj.weight": "mlp.gate_proj.weight",
}


def hessian_site(name: str) -> str:
    """Canonical weight name whose input Hessian serves ``name``."""
    for suffix, site in SHARED_INPUT.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + site
    return name


class HessianAccumulator:
    """Sums of X^T X and token counts of linear-layer inputs, keyed by canonical weight name."""

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype
        self.state: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, name: str, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).to(torch.bool).to(x.device)]
        x = x.to(self.dtype)
        key = f"xtx.{name}"
        if key not in self.state:
            self.state[key] = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
            self.state[f"n.{name}"] = torch.zeros((), dtype=torch.float64, device=x.device)
        self.state[key].addmm_(x.T, x)
        self.state[f"n.{name}"] += x.shape[0]

    def names(self) -> list[str]:
        return sorted(k[4:] for k in self.state if k.startswith("xtx."))

    def hessian(self, name: str, damp: float = 0.01) -> torch.Tensor:
        """H = 2 X^T X / n + damp * mean(diag) * I in float64, for the input of weight ``name``."""
        site = hessian_site(name)
        if f"xtx.{site}" not in self.state:
            raise PruningError(f"no calibration inputs recorded for {site}; run calibration batches with the recorder on")
        n = float(self.state[f"n.{site}"])
        return damped_hessian(self.state[f"xtx.{site}"], n, damp)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = dict(state)

    def to(self, device) -> None:
        """Move the sums to ``device`` (where the inputs ``add`` receives live)."""
        self.state = {k: v.to(device) for k, v in self.state.items()}

    def apply_plan(self, plan: PrunePlan) -> None:
        """Slice every Hessian by the kept input channels of its weight; rename kept layers."""
        axes = tensor_axes(plan.before)
        new_pos = {old: new for new, old in enumerate(plan.kept_layers)}
        out = {}
        for name in self.names():
            ax = axes[name][1]
            if ax.layer is not None and ax.layer not in new_pos:
                continue
            idx = expand_units(plan.kept(ax.kind, ax.layer), ax.unit).to(self.state[f"xtx.{name}"].device)
            new = name
            if ax.layer is not None:
                new = layer_prefix(new_pos[ax.layer]) + name[len(layer_prefix(ax.layer)):]
            out[f"xtx.{new}"] = self.state[f"xtx.{name}"].index_select(0, idx).index_select(1, idx)
            out[f"n.{new}"] = self.state[f"n.{name}"]
        self.state = out


def damped_hessian(xtx: torch.Tensor, n: float, damp: float = 0.01) -> torch.Tensor:
    if n <= 0:
        raise PruningError("Hessian from zero tokens; run calibration batches first")
    H = 2.0 * xtx.to(torch.float64) / n
    H.diagonal().add_(damp * float(H.diagonal().mean()) + (1e-12 if damp > 0 else 0.0))
    return H


def inverse_hessian(H: torch.Tensor) -> torch.Tensor:
    """H^-1 through Cholesky (float64); a singular H asks for damping."""
    H = H.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise PruningError("layer Hessian is not positive definite; use damp > 0 (e.g. 0.01) or more calibration tokens")
    return torch.cholesky_inverse(L)


def _groups(columns: torch.Tensor, group_size: int) -> torch.Tensor:
    columns = torch.as_tensor(columns, dtype=torch.long)
    if columns.numel() % group_size:
        raise PruningError(f"{columns.numel()} columns do not split into groups of {group_size}")
    return columns.reshape(-1, group_size)


def obs_saliency(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """S_P = 1/2 tr(W[:,P] ((H^-1)[P,P])^-1 W[:,P]^T) for every row P of ``groups`` [G, u]."""
    W = W.to(torch.float64)
    blocks = Hinv[groups[:, :, None], groups[:, None, :]]  # [G, u, u]
    Wp = W[:, groups].permute(1, 0, 2)  # [G, rows, u]
    M = torch.linalg.inv(blocks)
    return 0.5 * torch.einsum("gru,guv,grv->g", Wp, M, Wp)


def obs_update(W: torch.Tensor, H: torch.Tensor, remove: Iterable[int]) -> tuple[torch.Tensor, float]:
    """Block OBS: W + delta W with columns ``remove`` exactly zero (same shape), and S_P."""
    P = torch.as_tensor(list(remove) if not torch.is_tensor(remove) else remove, dtype=torch.long)
    if P.numel() == 0:
        return W.clone(), 0.0
    Hinv = inverse_hessian(H)
    out = W.to(torch.float64).clone()
    Wp = out[:, P]  # a copy: the columns before the update
    M = remove_columns_(out, Hinv, P)
    return out.to(W.dtype), float(0.5 * torch.einsum("ru,uv,rv->", Wp, M, Wp))


def remove_columns_(W: torch.Tensor, Hinv: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The OBS update in place: W <- W - W[:,P] M (H^-1)[P,:] with columns P exactly zero, for
    M = ((H^-1)[P,P])^-1, which is returned (for S_P and the downdate of H^-1)."""
    M = torch.linalg.inv(Hinv[P][:, P])
    W -= W[:, P] @ M @ Hinv[P, :]
    W[:, P] = 0.0
    return M


def downdate_inverse(Hinv: torch.Tensor, P: torch.Tensor, M: torch.Tensor,
                     keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """H^-1 after columns P are gone (rank-|P|): H^-1 - H^-1[:,P] M H^-1[P,:]. With ``keep`` (the
    remaining columns) only that block is formed: the inverse over the remaining columns."""
    if keep is None:
        return Hinv - Hinv[:, P] @ M @ Hinv[P, :]
    return Hinv[keep][:, keep] - Hinv[keep][:, P] @ M @ Hinv[P][:, keep]


def obs_greedy(
    W: torch.Tensor,
    H: torch.Tensor,
    num_groups: int,
    group_size: int = 1,
    candidates: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove ``num_groups`` column groups one at a time, each the cheapest under the current H^-1.

    ``candidates`` [G, u] lists the removable groups (default: consecutive groups of
    ``group_size`` columns). Returns (removed group indices into ``candidates`` in removal
    order, W updated with the removed columns exactly zero, same shape).
    """
    cols = W.shape[1]
    cand = _groups(torch.arange(cols), group_size) if candidates is None else torch.as_tensor(candidates, dtype=torch.long)
    if num_groups > cand.shape[0]:
        raise PruningError(f"cannot remove {num_groups} groups out of {cand.shape[0]}")
    Hinv = inverse_hessian(H)
    W64 = W.to(torch.float64).clone()
    alive = torch.ones(cand.shape[0], dtype=torch.bool)
    removed = []
    for _ in range(num_groups):
        idx = torch.nonzero(alive).flatten()
        s = obs_saliency(W64, Hinv, cand[idx])
        pick = int(idx[int(torch.argmin(s))])  # argmin returns the first minimum: lowest index on ties
        g = cand[pick]
        M = remove_columns_(W64, Hinv, g)
        Hinv = downdate_inverse(Hinv, g, M)
        alive[pick] = False
        removed.append(pick)
        gone = cand[torch.as_tensor(removed)].reshape(-1)
        W64[:, gone] = 0.0  # exact zeros (the downdated H^-1 leaves rounding residue there)
        Hinv[gone, :] = 0.0
        Hinv[:, gone] = 0.0
    return torch.as_tensor(removed, dtype=torch.long), W64.to(W.dtype)


# ---------------------------------------------------------------------- whole-model helpers
def obs_group_scores(
    tensors: dict[str, torch.Tensor], arch: Architecture, hessians: HessianAccumulator, damp: float = 0.01
) -> GroupScores:
    """Local OBS saliency of query heads (o_proj columns) and FFN channels (down_proj columns).

    On the scale of layer-output squared error; KV groups, hidden channels and layers are not
    scored (selectors leave them alone).
    """
    heads, ffn = [], []
    d = arch.head_dim
    for l, s in enumerate(arch.layers):
        p = layer_prefix(l)
        o = p + "self_attn.o_proj.weight"
        heads.append(obs_saliency(tensors[o], inverse_hessian(hessians.hessian(o, damp)),
                                  _groups(torch.arange(s.num_heads * d), d)))
        down = p + "mlp.down_proj.weight"
        ffn.append(obs_saliency(tensors[down], inverse_hessian(hessians.hessian(down, damp)),
                                _groups(torch.arange(s.ffn_hidden_size), 1)))
    return GroupScores(arch, heads=heads, kv=None, ffn=ffn, hidden=None, layers=None)


@torch.no_grad()
def apply_obs_update(
    tensors: dict[str, torch.Tensor],
    plan: PrunePlan,
    hessians: HessianAccumulator,
    damp: float = 0.01,
    hidden: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """OBS-update the readers of what ``plan`` removes, before slicing (shapes unchanged).

    o_proj absorbs removed query heads, down_proj removed FFN channels; with ``hidden=True``
    q/k/v, gate/up and (untied) lm_head absorb removed hidden channels. Returns the updated
    dict and the predicted output error S_P per updated weight.
    """
    arch = plan.before
    check_state_dict(arch, tensors)
    out = dict(tensors)
    errors: dict[str, float] = {}
    d = arch.head_dim

    def update(name, removed_cols):
        if removed_cols.numel() == 0:
            return
        out[name], errors[name] = obs_update(out[name], hessians.hessian(name, damp), removed_cols)

    def removed(kind, layer, n):
        mask = torch.ones(n, dtype=torch.bool)
        mask[plan.kept(kind, layer)] = False
        return torch.nonzero(mask).flatten()

    for l in plan.kept_layers:
        s = arch.layers[l]
        p = layer_prefix(l)
        update(p + "self_attn.o_proj.weight", expand_units(removed("head", l, s.num_heads), d))
        update(p + "mlp.down_proj.weight", removed("ffn", l, s.ffn_hidden_size))
        if hidden:
            cols = removed("hidden", None, arch.hidden_size)
            for suffix in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                           "mlp.gate_proj.weight", "mlp.up_proj.weight"):
                update(p + suffix, cols)
    if hidden and not arch.tie_word_embeddings:
        update("lm_head.weight", removed("hidden", None, arch.hidden_size))
    return out, errors
