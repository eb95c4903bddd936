"""Reading pickle-based files without running code they could carry.

Unpickling a file can call any function the file names (``os.system`` and the like), so a
checkpoint copied from elsewhere, or changed by anyone who can write the run folder, could run
code in every process that reads it. Every pickle this program reads goes through here:

- our own files (trainer state, per-rank state, RNG state): only plain containers (dict, list,
  tuple), numbers, strings, None and tensors, written from CPU copies by ``plain_copy`` and read
  by ``load_plain`` (``torch.load(weights_only=True)`` and a check of what came back);
- a third party's torch files (DeepSpeed's engine files): ``load_torch`` with torch's
  restricted unpickler and an explicit list of the classes they hold;
- torch distributed-checkpoint metadata (``.metadata`` of a megatron checkpoint):
  ``load_dcp_metadata``, a ``pickle.Unpickler`` that resolves only the metadata classes.

Anything else is refused in one ``UserError`` line naming the file. Our own files stay
``torch.save`` files (rather than JSON next to safetensors): the state mixes large tensors
(Hessians, masks) with small nested containers whose tuples and integer keys JSON would lose,
and torch's restricted unpickler already accepts exactly that, with no second format to keep
in step.
"""
from __future__ import annotations

import pickle
import re
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_effllm.errors import UserError

_PLAIN_SCALARS = (bool, int, float, str, type(None))

_REFUSED = ("it was changed or comes from elsewhere; loading it could run code, so it is not loaded "
            "(restore the file, or use a checkpoint written by this program)")


def plain_copy(obj, where: str = "state"):
    """A deep copy of ``obj`` made of plain containers, numbers, strings, None and CPU tensors.

    numpy scalars become Python numbers, mappings dicts, tuples tuples (named ones plain);
    anything else raises TypeError: it could not be read back by ``load_plain``.
    """
    if type(obj) in _PLAIN_SCALARS:
        return obj
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {plain_copy(k, where): plain_copy(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_copy(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be saved in a checkpoint "
                    "(plain containers, numbers, strings and tensors only)")


def _first_foreign(obj, where: str = "") -> Optional[str]:
    """Where the first value that is not plain (see ``plain_copy``) sits, and its type."""
    if type(obj) in _PLAIN_SCALARS or type(obj) is torch.Tensor:
        return None
    if type(obj) is dict:
        for k, v in obj.items():
            found = _first_foreign(k, where) or _first_foreign(v, f"{where}[{k!r}]")
            if found:
                return found
        return None
    if type(obj) in (list, tuple):
        return next((f for i, v in enumerate(obj) if (f := _first_foreign(v, f"{where}[{i}]"))), None)
    return f"a {type(obj).__name__} at {where or 'the top level'}"


def _global_named(err: BaseException) -> Optional[str]:
    """The global a restricted unpickler refused (its message names it), if that was the refusal."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else None


def _detail(err: BaseException) -> str:
    """The line of an error message that says what went wrong (torch's carry advice around it)."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    detail = next((l for l in lines if not l.startswith(advice)),
                  lines[0] if lines else type(err).__name__)
    return " ".join(detail.split())[:160]


def load_torch(path: str, allowed: Sequence = (), *, mmap: bool = False):
    """``torch.load`` through torch's restricted unpickler on the CPU; ``allowed``: the classes
    and functions beyond tensors and plain containers the file may name. UserError otherwise."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError, KeyError, IndexError,
            TypeError, AttributeError) as err:
        name = _global_named(err)
        if name:
            raise UserError(f"{path} is refused: it refers to {name}, which this file never holds; {_REFUSED}") from None
        raise UserError(f"{path} is not a readable checkpoint file ({_detail(err)}); restore it or use "
                        "another checkpoint") from None


def check_torch_file(path: str, allowed: Sequence = ()) -> None:
    """Refuse (UserError) a file ``load_torch`` would refuse, without reading its tensors."""
    load_torch(path, allowed, mmap=True)


def load_plain(path: str):
    """One of our own state files: plain containers, numbers, strings, None and tensors on the
    CPU (what ``plain_copy`` writes). UserError naming the file for anything else."""
    obj = load_torch(path)
    foreign = _first_foreign(obj)
    if foreign:
        raise UserError(f"{path} is refused: it holds {foreign}, which this file never holds; {_REFUSED}")
    return obj


# ------------------------------------------------------------------ torch distributed checkpoint
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by name (torch.strided)
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a distributed checkpoint's metadata is made of, and dtypes."""

    def find_class(self, module: str, name: str):
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def load_dcp_metadata(path: str):
    """The ``Metadata`` of a torch distributed checkpoint (its ``.metadata`` file), unpickled
    with only the metadata classes; UserError naming the file for anything else."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError) as err:
        name = _global_named(err)
        if name:
            raise UserError(f"{path} is refused: it refers to {name}, which checkpoint metadata never holds; "
                            f"{_REFUSED}") from None
        raise UserError(f"{path} is unreadable ({type(err).__name__}); the checkpoint is damaged") from None
    if not isinstance(meta, Metadata):
        raise UserError(f"{path} holds a {type(meta).__name__}, not checkpoint metadata; the checkpoint is damaged")
    return meta
