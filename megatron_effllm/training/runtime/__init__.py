"""Pruning inside a training run: the adapter between the pruning core (canonical tensors) and
the live megatron-core model inside the training engine (``factory.make_runtime``)."""
