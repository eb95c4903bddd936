"""Checkpointable runtime state. The saliency runtime's running statistics across ranks and in checkpoints: scores, OBS
Hessians (and the cached H^-1 of the current compaction cycle) and Adapt-Pruner's layer cosines.

Every rank accumulates its own sums (a decision reads their reduction) and saves them as they
are (``rank_state``): a checkpoint, taken at whatever step a preemption falls on, changes nothing
in memory, and a resumed rank continues exactly the sums it had. (Summing them onto one rank
before saving would round differently from the run that went on unsaved.) What a rank's file
would repeat is left out, bit-exactly restorable: a saliency vector is saved over the range
where it is not zero (at TP > 1 a rank feeds only its slice of the heads and channels, under PP
only its stage's layers), and the cached H^-1, the same on every data-parallel rank of a model
shard (an inverse of the Hessian reduced over DP), is saved once per shard (``dp_shared_state``).
Checkpoints hold CPU copies (``training.checkpoint``); ``to_device`` puts them back next to the
model.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_effllm.errors import UserError
from megatron_effllm.pruning import obs as obs_mod


class Statistics:
    """The running sums of one rank: ``saliency`` (GradSaliency), ``hessians``
    (HessianAccumulator), ``layer_cos`` ([layers, 2]: sum cos, count) and ``obs_cache``
    ({canonical name: (alive units, H^-1)}). ``cos_split_over_tp``: the blocks see one slice of
    the sequence per TP rank (sequence parallelism), so the layer cosines are partial sums over TP."""

    def __init__(self, saliency, hessians: obs_mod.HessianAccumulator, layer_cos: torch.Tensor,
                 cos_split_over_tp: bool = False):
        self.saliency, self.hessians, self.layer_cos = saliency, hessians, layer_cos
        self.cos_split_over_tp = cos_split_over_tp
        self.obs_cache: dict = {}
        self._saved: Optional[dict] = None  # the small sums before the current step
        self._hessian_decay: Optional[float] = None
        self._hessian_inputs: list = []  # (canonical name, inputs) of the current step

    def begin_step(self, hessian_decay: Optional[float]) -> None:
        """Before a step that collects: copies of the small sums (a few numbers per group), which
        a skipped step puts back. The Hessians are not copied (each is width^2): their decay
        and this step's inputs wait for ``end_step``; ``hessian_decay`` None: no Hessians."""
        self._saved = {"saliency": {k: v.clone() for k, v in self.saliency.state.items()},
                       "layer_cos": self.layer_cos.clone()}
        self._hessian_decay = hessian_decay
        self._hessian_inputs = []

    def add_hessian_input(self, name: str, x: torch.Tensor) -> None:
        """A layer input of the current step (a copy: it must not hold the activation)."""
        self._hessian_inputs.append((name, x))

    @torch.no_grad()
    def end_step(self, skipped: torch.Tensor) -> None:
        """Keep the step's statistics, or (``skipped``, a device flag) put back those before it;
        decided on the device. Then decay the Hessians and add the step's inputs, in the order
        the sums always took (bit for bit the same as adding them in the forward pass)."""
        if self._saved is None:
            return
        bad = skipped.reshape(()) > 0
        saved, self._saved = self._saved, None
        self.saliency.state = {k: torch.where(bad, saved["saliency"][k], v) for k, v in self.saliency.state.items()}
        self.layer_cos = torch.where(bad, saved["layer_cos"], self.layer_cos)
        if self._hessian_decay is None:
            return
        state = self.hessians.state
        scale = torch.where(bad, 1.0, torch.full((), self._hessian_decay, dtype=torch.float64, device=bad.device))
        for v in state.values():
            v.mul_(scale.to(v.dtype))
        keep = (~bad).to(torch.float64)
        for name, x in self._hessian_inputs:
            key = f"xtx.{name}"
            if key not in state:
                state[key] = torch.zeros(x.shape[1], x.shape[1], dtype=self.hessians.dtype, device=x.device)
                state[f"n.{name}"] = torch.zeros((), dtype=torch.float64, device=x.device)
            x = torch.where(bad, 0.0, x.to(self.hessians.dtype))
            state[key].addmm_(x.T, x)
            state[f"n.{name}"] += keep * x.shape[0]
        self._hessian_inputs = []

    def dp_shared_state(self) -> dict:
        """The downdated H^-1 of the current compaction cycle (recomputing it on resume from the
        newer Hessian would change the OBS updates that follow); identical on the DP ranks."""
        return {"obs_cache": {k: (list(a), h.clone()) for k, (a, h) in self.obs_cache.items()}}

    def to_device(self, device) -> None:
        """Put every running sum where the model is (a checkpoint loads them on the CPU): the
        gradient hooks, Hessian inputs and block cosines then add into them without a copy to
        the host (on a GPU, each would be a synchronisation inside the backward pass)."""
        self.saliency.state = {k: v.to(device) for k, v in self.saliency.state.items()}
        self.hessians.to(device)
        self.layer_cos = self.layer_cos.to(device)
        self.obs_cache = {k: (a, h.to(device)) for k, (a, h) in self.obs_cache.items()}

    def rank_state(self) -> dict:
        """This rank's running sums and Hessians, as they are (saliency vectors trimmed to where
        they are not zero)."""
        return {"saliency": {k: nonzero_range(v) for k, v in self.saliency.state_dict().items()},
                "layer_cos": self.layer_cos.clone(),
                "hessians": {k: v.clone() for k, v in self.hessians.state_dict().items()}}

    def load_rank_state(self, state: dict, dp_shared: Optional[dict] = None) -> None:
        self.saliency.load_state_dict({k: from_range(v) for k, v in state["saliency"].items()})
        self.layer_cos = state["layer_cos"].clone()
        self.hessians = obs_mod.HessianAccumulator()
        self.hessians.load_state_dict(state["hessians"])
        self.obs_cache = dict((dp_shared or {}).get("obs_cache", {}))


def nonzero_range(v: torch.Tensor):
    """A vector as ``{"start", "size", "values"}``: its values from the first to the last entry
    that is not +0.0 (-0.0 and NaN kept), so that ``from_range`` restores it bit for bit; other
    tensors as they are."""
    if v.dim() != 1:
        return v.clone()
    v = v.detach().cpu()
    kept = torch.nonzero((v != 0) | torch.signbit(v)).flatten()
    lo, hi = (int(kept[0]), int(kept[-1]) + 1) if kept.numel() else (0, 0)
    return {"start": lo, "size": v.numel(), "values": v[lo:hi].clone()}


def from_range(saved):
    """The vector ``nonzero_range`` saved (zeros outside its range)."""
    if torch.is_tensor(saved):
        return saved
    try:
        start, size, values = int(saved["start"]), int(saved["size"]), saved["values"]
        out = torch.zeros(size, dtype=values.dtype)
        out[start:start + values.numel()] = values
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
        raise UserError("a saliency vector of the checkpoint's per-rank state is damaged (expected start, "
                        "size and values within it); restore the checkpoint or resume from an earlier one") from None
    return out
