"""One parameter's copies under DeepSpeed ZeRO: its fp32 master, its Adam moments and, under
ZeRO-3, the rank-local partition of its data. ``DeepSpeedEngine`` exposes these through the
``TrainEngine`` protocol (``full_fp32_param``, ``set_full_param``, ``is_partitioned``,
``local_partition``, ``local_part_of``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist  # the rank in a parameter's own partition group; no collective
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)


def has_master(p: torch.nn.Parameter) -> bool:
    """Whether a ZeRO optimizer keeps an fp32 master of ``p`` apart from the module's weight."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def full_fp32_param(p: torch.nn.Parameter) -> torch.Tensor:
    """``p``'s full fp32 master (collective under ZeRO-3); the weight itself when there is none."""
    master = safe_get_full_fp32_param(p)
    return (master if master is not None else p.detach()).float()


def is_zero3_param(p: torch.nn.Parameter) -> bool:
    """Whether ``p`` is partitioned by ZeRO-3 (its data lives in ``p.ds_tensor`` between uses)."""
    return hasattr(p, "ds_tensor")


def zero3_local_part(full: torch.Tensor, p: torch.nn.Parameter, fill: float = 0.0) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``full`` (shaped like ``p``): ZeRO-3 flattens a parameter,
    pads it to a multiple of the data-parallel size and gives rank r elements
    [r * n, (r + 1) * n), n = ``p.ds_tensor.numel()``; the padding gets ``fill``."""
    n = p.ds_tensor.numel()
    start = dist.get_rank(group=p.ds_process_group) * n if dist.is_initialized() else 0
    flat = full.reshape(-1)
    out = torch.full((n,), fill, dtype=full.dtype, device=full.device)
    piece = flat[start:start + n]
    out[:piece.numel()] = piece
    return out


def set_zero3_module_param(p: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Write ``full`` into this rank's partition of the module's (low-precision) copy of ``p``,
    which the next forward gathers; the fp32 master is set separately."""
    p.ds_tensor.data.copy_(zero3_local_part(full.to(p.ds_tensor.dtype), p))


def set_full_master(p: torch.nn.Parameter, full: torch.Tensor, optim_state_key: Optional[str] = None) -> None:
    """Set ``p``'s fp32 master (or Adam moment ``optim_state_key``) from its full value.

    Under ZeRO-3 through this rank's partition: DeepSpeed's ``safe_set_full_*`` cuts the full
    tensor without the padding of the last partition, so it fails for any size the
    data-parallel size does not divide (a pruned width, e.g. 39 channels on 2 ranks)."""
    if is_zero3_param(p):
        local = zero3_local_part(full.float(), p)
        if optim_state_key is None:
            safe_set_local_fp32_param(p, local)
        else:
            safe_set_local_optimizer_state(p, local, optim_state_key)
    elif optim_state_key is None:
        safe_set_full_fp32_param(p, full)
    else:
        safe_set_full_optimizer_state(p, full, optim_state_key)


def set_full_param(p: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Write ``full`` into every copy of ``p``: the fp32 master (when ZeRO keeps one) and the
    module's weight (under ZeRO-3 its local partition, which the next gather reads)."""
    if has_master(p):
        set_full_master(p, full)
    if is_zero3_param(p):
        set_zero3_module_param(p, full)
    else:
        p.data.copy_(full.to(p.dtype))
