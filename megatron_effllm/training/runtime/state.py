"""Checkpointable runtime state. The saliency runtime's running statistics across ranks and in checkpoints: scores, OBS
Hessians (and the cached H^-1 of the current compaction cycle) and Adapt-Pruner's layer cosines.

Every rank accumulates its own sums (a decision reads their reduction) and saves them as they
are (``rank_state``): a checkpoint, taken at whatever step a preemption falls on, changes nothing
in memory, and a resumed rank continues exactly the sums it had. (Summing them onto one rank
before saving would round differently from the run that went on unsaved.) Checkpoints hold CPU
copies (``training.checkpoint``); ``to_device`` puts them back next to the model.
"""
from __future__ import annotations

import torch

from megatron_effllm.pruning import obs as obs_mod


class Statistics:
    """The running sums of one rank: ``saliency`` (GradSaliency), ``hessians``
    (HessianAccumulator), ``layer_cos`` ([layers, 2]: sum cos, count) and ``obs_cache``
    ({canonical name: (alive units, H^-1)})."""

    def __init__(self, saliency, hessians: obs_mod.HessianAccumulator, layer_cos: torch.Tensor):
        self.saliency, self.hessians, self.layer_cos = saliency, hessians, layer_cos
        self.obs_cache: dict = {}

    def snapshot(self) -> dict:
        """Copies of what a step adds to (put back by ``restore`` when the step is skipped)."""
        return {"saliency": {k: v.clone() for k, v in self.saliency.state.items()},
                "hessians": {k: v.clone() for k, v in self.hessians.state.items()},
                "layer_cos": self.layer_cos.clone()}

    def restore(self, snap: dict) -> None:
        self.saliency.state = snap["saliency"]
        self.hessians.state = snap["hessians"]
        self.layer_cos = snap["layer_cos"]

    def local_obs_state(self) -> dict:
        return {
            "hessians": {k: v.clone() for k, v in self.hessians.state_dict().items()},
            # The downdated H^-1 of the current compaction cycle: recomputing it on resume from
            # the newer Hessian would change the OBS updates that follow.
            "obs_cache": {k: (list(a), h.clone()) for k, (a, h) in self.obs_cache.items()},
        }

    def to_device(self, device) -> None:
        """Put every running sum where the model is (a checkpoint loads them on the CPU): the
        gradient hooks, Hessian inputs and block cosines then add into them without a copy to
        the host (on a GPU, each would be a synchronisation inside the backward pass)."""
        self.saliency.state = {k: v.to(device) for k, v in self.saliency.state.items()}
        self.hessians.to(device)
        self.layer_cos = self.layer_cos.to(device)
        self.obs_cache = {k: (a, h.to(device)) for k, (a, h) in self.obs_cache.items()}

    def load_local_obs_state(self, state: dict) -> None:
        self.hessians = obs_mod.HessianAccumulator()
        self.hessians.load_state_dict(state["hessians"])
        self.obs_cache = dict(state.get("obs_cache", {}))

    def rank_state(self) -> dict:
        """This rank's running sums and OBS state, as they are."""
        return {"saliency": {k: v.clone() for k, v in self.saliency.state_dict().items()},
                "layer_cos": self.layer_cos.clone(), **self.local_obs_state()}

    def load_rank_state(self, state: dict) -> None:
        self.saliency.load_state_dict(state["saliency"])
        self.layer_cos = state["layer_cos"].clone()
        self.load_local_obs_state(state)
