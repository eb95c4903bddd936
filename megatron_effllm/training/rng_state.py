"""Every random generator's state (Python, numpy, torch, CUDA, megatron's tracker) as plain
values and tensors, which a checkpoint saves per rank."""
from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import tensor_parallel


def rng_state() -> dict:
    """Every generator's state as plain values and tensors (numpy's key array as a list)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, key.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if tracker.is_initialized():  # not seeded: no megatron model parallelism (plain models in tests)
        state["megatron_tracker"] = tracker.get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "megatron_tracker" in state:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])
