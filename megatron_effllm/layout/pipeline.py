"""Pipeline placement: which contiguous range of layers each pipeline stage holds.

A stage's megatron state dict numbers its layers locally from 0 (``decoder.layers.0`` is the
stage's first layer); ``stage_layers`` gives their global positions.
"""
from __future__ import annotations

from megatron_effllm.errors import UserError


def stage_layer_counts(num_layers: int, pp_size: int) -> list[int]:
    """Layers per pipeline stage: as even as possible, the first stages take the remainder
    (the last stage also carries the output layer and the loss)."""
    if pp_size < 1:
        raise UserError(f"pipeline parallel size must be >= 1, got {pp_size}")
    if num_layers < pp_size:
        raise UserError(
            f"{num_layers} layers cannot fill {pp_size} pipeline stages; "
            "use a pipeline parallel size <= the number of layers"
        )
    base, extra = divmod(num_layers, pp_size)
    return [base + (1 if s < extra else 0) for s in range(pp_size)]


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global layer indices held by pipeline stage ``pp_rank``."""
    counts = stage_layer_counts(num_layers, pp_size)
    if not 0 <= pp_rank < pp_size:
        raise UserError(f"pipeline rank {pp_rank} out of range for {pp_size} stages")
    start = sum(counts[:pp_rank])
    return range(start, start + counts[pp_rank])
