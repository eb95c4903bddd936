"""The training-engine seam: ``base.TrainEngine`` is what the trainer and the pruning runtimes
speak to; ``build_engine`` makes the one ``parallel.engine`` names. ``deepspeed_engine`` (DeepSpeed
ZeRO) is the only implementation today and the only module of the package that imports
``deepspeed``; another engine (torch FSDP2) is one more module and one line in ``ENGINES``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the config reads ENGINES without importing torch
    import torch

    from megatron_effllm.engine.base import EngineOptions, TrainEngine

# name -> "module:class". Imported on use: an engine's framework (deepspeed) is needed only by
# runs that choose it.
ENGINES = {"deepspeed": "megatron_effllm.engine.deepspeed_engine:DeepSpeedEngine"}


def build_engine(name: str, model: "torch.nn.Module", options: "EngineOptions") -> "TrainEngine":
    """The engine called ``name`` (a key of ``ENGINES``) over ``model``."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, options)
