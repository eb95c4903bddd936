"""Structured pruning on plain tensors: the canonical HF-named state dict plus an Architecture.

- ``groups``     minimal parameter groups, what each owns (``tensor_axes``), costs, ``PrunePlan``
- ``saliency``   statistics for scoring (gradient and activation sums, DP-summable), ``GroupScores``
- ``registry``   the registered estimators, selectors and strategies (one vocabulary)
- ``estimators`` one module per saliency estimator (Taylor, Fisher, mix, magnitude, activations, OBS)
- ``selection``  constraints and per-layer widths -> plan, shared by the selectors
- ``selectors``  one module per selector (global cost-aware ranking, uniform ratio, Adapt-Pruner)
- ``strategies`` what ``prune.strategy`` / ``--strategy`` names: runtime, selector, one-shot support
- ``surgery``    masks (soft) and slicing (physical removal) of any canonically shaped dict
- ``obs``        layer Hessians and the second-order (OBS) update of the surviving columns
- ``l0``         Sheared-LLaMA hard-concrete gates and the expected-size Lagrangian
- ``hooks``      reading an HF-layout model: weights/grads, activations, Hessians, mask hooks
- ``calibrate`` / ``oneshot``  calibration passes and the one-shot prune pipeline

No process group, engine or megatron import here, and nothing from ``eval`` or ``training``;
the canonical schema comes from ``layout.canonical``, and megatron layouts enter through
``layout`` in the training adapter.
"""
