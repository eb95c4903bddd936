"""DeepSpeed's checkpoint files, read without running code: its own checkpoint engine would
unpickle them with no restriction and write tensors where they live. ``RestrictedCheckpointEngine``
writes CPU copies (a checkpoint loads on any device), remembers which files it wrote, and reads through torch's restricted
unpickler with the few DeepSpeed classes the files hold (``DEEPSPEED_GLOBALS``);
``check_engine_files`` checks every file on some rank before any rank reads one."""
from __future__ import annotations

import copy
import os

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from megatron_effllm.errors import UserError
from megatron_effllm.parallel import comm
from megatron_effllm.safe_pickle import check_torch_file, load_torch

# What DeepSpeed 0.19's files name beyond tensors and containers (read from checkpoints saved at
# ZeRO 0-3, fp32 and bf16): the loss scaler, the ZeRO stage, a parameter's place in a flat
# partition. Rebuilding them runs no code of the file.
DEEPSPEED_GLOBALS = (LossScaler, ZeroStageEnum, fragment_address)


def _on_cpu(obj):
    """``obj`` with every tensor in its nested dicts, lists and tuples on the CPU."""
    if torch.is_tensor(obj):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same kind of mapping (an OrderedDict stays one)
        for key, value in obj.items():
            out[key] = _on_cpu(value)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


class RestrictedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, writing CPU copies (a checkpoint loads on any device)
    and reading only tensors, containers and ``DEEPSPEED_GLOBALS`` (UserError naming the file)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written: list[str] = []  # the files this process wrote (it hashes them for the manifest)

    def save(self, state_dict, path: str):
        super().save(_on_cpu(state_dict), path)
        self.written.append(path)

    def load(self, path: str, map_location=None):
        return load_torch(path, DEEPSPEED_GLOBALS)


def check_engine_files(ds_dir: str) -> None:
    """Every file of DeepSpeed's checkpoint folder ``ds_dir`` checked (split over the ranks,
    tensors unread) before any rank reads one; the first refusal is raised on every rank."""
    files = sorted(os.path.join(root, n) for root, _, names in os.walk(ds_dir) for n in names)
    error = None
    try:
        for path in files[comm.global_rank()::comm.world_size()]:
            check_torch_file(path, DEEPSPEED_GLOBALS)
    except UserError as err:
        error = str(err)
    error = next((e for e in comm.all_gather_object(error) if e), None)
    if error is not None:
        raise UserError(error)

