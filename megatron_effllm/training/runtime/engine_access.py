"""Everything the pruning runtimes ask of the training engine, in one place and named like the
methods of ``engine.base.TrainEngine`` (today through ``training.engine``'s DeepSpeed helpers):
a parameter's full fp32 value, writing a full value into every copy the engine keeps, and the
rank-local partition of a parameter partitioned between uses (ZeRO-3)."""
from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_fp32_param

from megatron_effllm.training import engine as eng


def full_fp32_param(engine, p: torch.nn.Parameter) -> torch.Tensor:
    """``p``'s full fp32 master value (the weight itself, as fp32, when the engine keeps none)."""
    W = safe_get_full_fp32_param(p)
    return (W if W is not None else p.detach()).float()


def set_full_param(engine, p: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Write ``full`` into the fp32 master, the partition (ZeRO-3) or the module's weight."""
    if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
        eng.set_full_master(p, full)
    if eng.is_zero3_param(p):
        eng.set_zero3_module_param(p, full)
    else:
        p.data.copy_(full.to(p.dtype))


def is_partitioned(p: torch.nn.Parameter) -> bool:
    """Whether ``p``'s data lives in a rank-local partition between uses (ZeRO-3)."""
    return eng.is_zero3_param(p)


def local_partition(p: torch.nn.Parameter) -> torch.Tensor:
    """The rank-local partition tensor of a partitioned ``p`` (to mask in place)."""
    return p.ds_tensor.data


def local_part_of(full: torch.Tensor, p: torch.nn.Parameter, fill: float = 0.0) -> torch.Tensor:
    """This rank's partition of a full tensor shaped like ``p`` (padding filled with ``fill``)."""
    return eng.zero3_local_part(full, p, fill=fill)
