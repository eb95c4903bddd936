"""One-shot structured pruning of a loaded model: calibrate, score, select, (OBS-)update, slice.

The pieces are separate so that one calibration pass can serve several selections:

    calib = collect(model, arch, windows, options)
    plan = choose(calib, arch, state_dict, options)
    small = apply(state_dict, plan, calib, options)      # canonical dict of plan.after
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError
from megatron_effllm.pruning.calibrate import calibrate
from megatron_effllm.pruning.estimators.base import Statistics
from megatron_effllm.pruning.event import make_selector, next_plan
from megatron_effllm.pruning.groups import PrunePlan
from megatron_effllm.pruning.obs import HessianAccumulator, apply_obs_update
from megatron_effllm.pruning.registry import ESTIMATORS, SELECTORS, STRATEGIES
from megatron_effllm.pruning.saliency import ActivationSaliency, GradSaliency
from megatron_effllm.pruning.selection import Constraints
from megatron_effllm.pruning.surgery import slice_state_dict


@dataclass
class OneShotOptions:
    target_params: int
    estimator: str = "fisher"
    strategy: str = "efficientllm"  # a strategy with oneshot=True (registry.STRATEGIES)
    obs: bool = False
    obs_hidden: bool = False
    obs_damp: float = 0.01
    batch_size: int = 4
    constraints: Constraints = field(default_factory=Constraints)
    adaptive_steps: int = 10
    adaptive_A: float = 0.02

    def check(self) -> None:
        ESTIMATORS.get(self.estimator)
        if not STRATEGIES.get(self.strategy).oneshot:
            raise UserError(f"strategy {self.strategy!r} runs only in training; one-shot strategies: "
                            f"{', '.join(STRATEGIES.names(oneshot=True))}")
        if self.obs_hidden and not self.obs:
            raise UserError("--obs-hidden needs --obs")

    def selector(self):
        return SELECTORS.get(STRATEGIES.get(self.strategy).selector)


def collect(
    model: torch.nn.Module,
    arch: Architecture,
    windows: torch.Tensor,
    options: OneShotOptions,
    log: Optional[Callable[[str], None]] = None,
    estimators: Optional[Iterable[str]] = None,
) -> Statistics:
    """One calibration pass recording what the options need (and nothing more).

    Gradient sums are kept for the options' estimator, or for each of ``estimators`` (a caller
    that scores several gradient estimators from one pass names them): each quantity is a pass
    over every gradient, and fisher alone needs one of the three.
    """
    options.check()
    names = [options.estimator] + list(estimators or [])
    for name in names:
        ESTIMATORS.get(name)
    gradient = sorted({n for n in names if ESTIMATORS.get(n).gradient})
    need_acts = any("activations" in ESTIMATORS.get(n).needs for n in names) or options.selector().needs_layer_importance
    need_hess = options.obs or any("hessians" in ESTIMATORS.get(n).needs for n in names)
    calib = Statistics(
        grads=GradSaliency(arch, estimators=gradient) if gradient else None,
        activations=ActivationSaliency(arch) if need_acts else None,
        hessians=HessianAccumulator() if need_hess else None,
    )
    if gradient or need_acts or need_hess:
        calibrate(model, arch, windows, batch_size=options.batch_size, grads=calib.grads,
                  activations=calib.activations, hessians=calib.hessians,
                  hessian_sites="all" if options.obs_hidden else "obs", log=log)
    return calib


def choose(calib: Statistics, arch: Architecture, state_dict: dict, options: OneShotOptions) -> PrunePlan:
    """The selection for the options' estimator and strategy."""
    options.check()
    scores = ESTIMATORS.get(options.estimator).scores(calib, arch, state_dict)
    selector = options.selector()
    if selector.needs_layer_importance and calib.activations is None:
        raise UserError(f"strategy {options.strategy!r} needs block input/output statistics; "
                        "calibrate with it selected")
    # The training runtime's prune event, on one process: nothing masked yet, no ranks to agree.
    select = make_selector(selector, options.constraints, layer_importance=lambda: calib.activations.layer_importance(),
                           adapt_step=options.adaptive_A, adapt_steps=options.adaptive_steps)
    plan = next_plan(PrunePlan.identity(arch), options.target_params, lambda effective: scores, select)
    return PrunePlan.identity(arch) if plan is None else plan


def apply(state_dict: dict, plan: PrunePlan, calib: Statistics, options: OneShotOptions) -> dict:
    """(Optionally OBS-update the readers of removed channels, then) slice to ``plan.after``."""
    if options.obs:
        state_dict, _ = apply_obs_update(state_dict, plan, calib.hessians, damp=options.obs_damp,
                                         hidden=options.obs_hidden)
    return slice_state_dict(state_dict, plan)
