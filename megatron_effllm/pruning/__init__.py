"""Structured pruning on plain tensors: the canonical HF-named state dict plus an Architecture.

- ``groups``    minimal parameter groups, what each owns (``tensor_axes``), costs, ``PrunePlan``
- ``saliency``  per-group scores (Taylor, Fisher, mix, magnitude, activations), DP-summable sums
- ``selection`` global cost-aware ranking, uniform ratio, Adapt-Pruner, fixed target shape
- ``surgery``   masks (soft) and slicing (physical removal) of any canonically shaped dict
- ``obs``       layer Hessians and the second-order (OBS) update of the surviving columns
- ``l0``        Sheared-LLaMA hard-concrete gates and the expected-size Lagrangian
- ``hooks``     reading an HF-layout model: weights/grads, activations, Hessians, mask hooks
- ``calibrate`` / ``oneshot``  calibration passes and the one-shot prune pipeline

No process group, engine or megatron import here; the canonical schema comes from
``layout.canonical``, and megatron layouts enter through ``layout`` in the training adapter.
"""
