"""Calibration passes over an HF-layout model: token windows in, saliency / Hessian sums out.

The windows come from ``eval.perplexity.calibration_windows`` (text files -> token windows).
One forward (and, for gradient estimators, one backward of the mean next-token loss) per batch
of windows; whatever accumulators are given are fed: ``GradSaliency`` from the gradients,
``ActivationSaliency`` and ``HessianAccumulator`` through forward hooks.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.pruning.hooks import ActivationRecorder, weights_and_grads
from megatron_effllm.pruning.obs import HessianAccumulator
from megatron_effllm.pruning.saliency import ActivationSaliency, GradSaliency


def calibrate(
    model: torch.nn.Module,
    arch: Architecture,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    grads: Optional[GradSaliency] = None,
    activations: Optional[ActivationSaliency] = None,
    hessians: Optional[HessianAccumulator] = None,
    hessian_sites: str = "obs",
    log: Optional[Callable[[str], None]] = None,
) -> None:
    """Run the windows through ``model`` in batches, feeding the given accumulators."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    start = time.time()
    try:
        with ActivationRecorder(model, arch, activations=activations, hessians=hessians,
                                hessian_sites=hessian_sites):
            for i in range(0, windows.shape[0], batch_size):
                ids = windows[i : i + batch_size].to(device)
                if grads is None:
                    with torch.no_grad():
                        model(input_ids=ids)
                else:
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    weights, g = weights_and_grads(model, arch)
                    grads.update(weights, g, count=float(ids.shape[0]))
                    model.zero_grad(set_to_none=True)
                if log is not None:
                    done = min(i + batch_size, windows.shape[0])
                    log(f"calibration {done}/{windows.shape[0]} windows, {time.time() - start:.0f} s")
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
