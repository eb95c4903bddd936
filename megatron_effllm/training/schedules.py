"""Step -> learning rate, and step -> target parameter count.

Both are plain functions of the optimizer step, so a resumed run (or an engine rebuilt after a
prune) continues them exactly by step number alone.
"""
from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup: int, total: int,
                  schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Linear warm-up, then cosine decay to min_lr, WSD (warm-up, stable, decay), or constant."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, total - warmup)
        frac = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_fraction * total)))
        decay_start = total - decay_steps
        if step < decay_start:
            return lr
        frac = min(1.0, (step - decay_start) / decay_steps)
        return lr + (min_lr - lr) * frac
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def target_params(step: int, *, source: int, target: int, start: int, end: int,
                  curve: str = "linear") -> int:
    """Parameter count the model should have after ``step`` optimizer steps.

    Before ``start`` the source size; after ``end`` the target; in between linear, or cubic
    (fast early, gentle at the end, as in gradual magnitude pruning: the last removals, which
    hurt most, come slowest).
    """
    if step <= start:
        return source
    if step >= end:
        return target
    frac = (step - start) / (end - start)
    if curve == "cubic":
        frac = 1.0 - (1.0 - frac) ** 3
    elif curve != "linear":
        raise ValueError(f"unknown pruning curve {curve!r}")
    return int(round(source - (source - target) * frac))
