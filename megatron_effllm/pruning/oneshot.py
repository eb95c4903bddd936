"""One-shot structured pruning of a loaded model: calibrate, score, select, (OBS-)update, slice.

The pieces are separate so that one calibration pass can serve several selections:

    calib = collect(model, arch, windows, options)
    plan = choose(calib, arch, state_dict, options)
    small = apply(state_dict, plan, calib, options)      # canonical dict of plan.after
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError
from megatron_effllm.pruning.calibrate import calibrate
from megatron_effllm.pruning.groups import PrunePlan
from megatron_effllm.pruning.obs import HessianAccumulator, apply_obs_update, obs_group_scores
from megatron_effllm.pruning.saliency import (
    GRAD_ESTIMATORS,
    ActivationSaliency,
    GradSaliency,
    GroupScores,
    magnitude_scores,
)
from megatron_effllm.pruning.selection import Constraints, select_adaptive, select_global, select_uniform
from megatron_effllm.pruning.surgery import slice_state_dict

ONESHOT_ESTIMATORS = GRAD_ESTIMATORS + ("activation", "magnitude", "obs")
SELECTORS = ("global", "uniform", "adaptive")


@dataclass
class OneShotOptions:
    target_params: int
    estimator: str = "fisher"
    selector: str = "global"
    obs: bool = False
    obs_hidden: bool = False
    obs_damp: float = 0.01
    batch_size: int = 4
    constraints: Constraints = field(default_factory=Constraints)
    adaptive_steps: int = 10
    adaptive_A: float = 0.02

    def check(self) -> None:
        if self.estimator not in ONESHOT_ESTIMATORS:
            raise UserError(f"unknown estimator {self.estimator!r}; use one of {', '.join(ONESHOT_ESTIMATORS)}")
        if self.selector not in SELECTORS:
            raise UserError(f"unknown selector {self.selector!r}; use one of {', '.join(SELECTORS)}")
        if self.obs_hidden and not self.obs:
            raise UserError("--obs-hidden needs --obs")


@dataclass
class Calibration:
    grads: Optional[GradSaliency] = None
    activations: Optional[ActivationSaliency] = None
    hessians: Optional[HessianAccumulator] = None


def collect(
    model: torch.nn.Module,
    arch: Architecture,
    windows: torch.Tensor,
    options: OneShotOptions,
    log: Optional[Callable[[str], None]] = None,
) -> Calibration:
    """One calibration pass recording what the options need (and nothing more)."""
    options.check()
    need_grads = options.estimator in GRAD_ESTIMATORS
    need_acts = options.estimator == "activation" or options.selector == "adaptive"
    need_hess = options.obs or options.estimator == "obs"
    calib = Calibration(
        grads=GradSaliency(arch) if need_grads else None,
        activations=ActivationSaliency(arch) if need_acts else None,
        hessians=HessianAccumulator() if need_hess else None,
    )
    if need_grads or need_acts or need_hess:
        calibrate(model, arch, windows, batch_size=options.batch_size, grads=calib.grads,
                  activations=calib.activations, hessians=calib.hessians,
                  hessian_sites="all" if options.obs_hidden else "obs", log=log)
    return calib


def scores_of(calib: Calibration, arch: Architecture, state_dict: dict, estimator: str) -> GroupScores:
    if estimator in GRAD_ESTIMATORS:
        return calib.grads.scores(estimator)
    if estimator == "activation":
        return calib.activations.scores()
    if estimator == "magnitude":
        return magnitude_scores(state_dict, arch)
    return obs_group_scores(state_dict, arch, calib.hessians)


def choose(calib: Calibration, arch: Architecture, state_dict: dict, options: OneShotOptions) -> PrunePlan:
    """The selection for the options' estimator and selector."""
    options.check()
    scores = scores_of(calib, arch, state_dict, options.estimator)
    if options.selector == "global":
        return select_global(scores, options.target_params, options.constraints)
    if options.selector == "uniform":
        return select_uniform(scores, target_params=options.target_params, constraints=options.constraints)
    if calib.activations is None:
        raise UserError("the adaptive selector needs block input/output statistics; calibrate with it selected")
    c = options.constraints
    if c.prune_hidden:  # Adapt-Pruner shapes layers only
        c = dataclasses.replace(c, prune_hidden=False)
    plan, _ = select_adaptive(scores, calib.activations.layer_importance(), options.target_params,
                              steps=options.adaptive_steps, A=options.adaptive_A, constraints=c)
    return plan


def apply(state_dict: dict, plan: PrunePlan, calib: Calibration, options: OneShotOptions) -> dict:
    """(Optionally OBS-update the readers of removed channels, then) slice to ``plan.after``."""
    if options.obs:
        state_dict, _ = apply_obs_update(state_dict, plan, calib.hessians, damp=options.obs_damp,
                                         hidden=options.obs_hidden)
    return slice_state_dict(state_dict, plan)
