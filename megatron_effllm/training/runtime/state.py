"""Checkpointable runtime state. The saliency runtime's running statistics across ranks and in checkpoints: scores, OBS
Hessians (and the cached H^-1 of the current compaction cycle) and Adapt-Pruner's layer cosines.

Every data-parallel rank accumulates its own sums; ``consolidate`` moves them to one rank
without changing the totals (all any decision reads), so one copy of the shared state is saved.
Under TP / PP the Hessians differ between model-parallel ranks (each its own columns / layers)
and are saved by every rank (``local_obs_state``). Checkpoints hold CPU copies
(``training.checkpoint``); ``to_device`` puts them back next to the model.
"""
from __future__ import annotations

import torch

from megatron_effllm.parallel import comm
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

    def snapshot(self) -> dict:
        """Copies of what a step adds to (put back by ``restore`` when the step is skipped)."""
        return {"saliency": {k: v.clone() for k, v in self.saliency.state.items()},
                "hessians": {k: v.clone() for k, v in self.hessians.state.items()},
                "layer_cos": self.layer_cos.clone()}

    def restore(self, snap: dict) -> None:
        self.saliency.state = snap["saliency"]
        self.hessians.state = snap["hessians"]
        self.layer_cos = snap["layer_cos"]

    @torch.no_grad()
    def consolidate(self) -> None:
        """Move every data-parallel rank's running sums to DP rank 0 (others hold zeros), and the
        saliency sums also to TP rank 0 and the first stage (each stage: its own layers')."""
        if comm.size("dp") > 1:
            first = comm.rank("dp") == 0
            self._move_to_first("dp", first, (self.saliency.state, self.hessians.state,
                                              {"layer_cos": self.layer_cos}))
        if comm.size("tp") > 1:  # partial, zero-padded sums: they add up
            self._move_to_first("tp", comm.rank("tp") == 0, (self.saliency.state,)
                                + (({"layer_cos": self.layer_cos},) if self.cos_split_over_tp else ()))
        if comm.size("pp") > 1:
            self._move_to_first("pp", comm.rank("pp") == 0, (self.saliency.state, {"layer_cos": self.layer_cos}))

    @staticmethod
    def _move_to_first(group: str, first: bool, states) -> None:
        for state in states:
            for key in sorted(state):
                comm.all_reduce_(state[key], group)
                if not first:
                    state[key].zero_()

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

    def shared_state(self) -> dict:
        return {"saliency": {k: v.clone() for k, v in self.saliency.state_dict().items()},
                "layer_cos": self.layer_cos.clone()}

    def load_shared_state(self, state: dict) -> None:
        """A state saved after ``consolidate`` (by rank 0): the other DP ranks start their sums
        from zero, and so do the other TP ranks' and stages' saliency sums."""
        first, first_tp, first_pp = comm.rank("dp") == 0, comm.rank("tp") == 0, comm.rank("pp") == 0
        saliency = state["saliency"]
        if not (first and first_tp and first_pp):
            saliency = {k: torch.zeros_like(v) for k, v in saliency.items()}
        hessians = state.get("hessians", {})
        if not first:
            hessians = {k: torch.zeros_like(v) for k, v in hessians.items()}
        self.saliency.load_state_dict(saliency)
        self.load_local_obs_state({"hessians": hessians, "obs_cache": state.get("obs_cache", {})})
        cos_here = first and first_pp and (first_tp or not self.cos_split_over_tp)
        self.layer_cos = state["layer_cos"].clone() if cos_here else torch.zeros_like(state["layer_cos"])
