"""Every collective of the package goes through this module.

Groups are named, not passed: ``"world"``, ``"dp"`` (data parallel), ``"tp"`` (tensor
parallel), ``"pp"`` (pipeline), ``"mp"`` (model parallel: TP x PP, one model replica),
``"embedding"`` (first and last stage, tied embeddings). They
resolve to megatron-core's ``parallel_state`` groups when model parallelism is initialised; with
a bare process group every rank is data-parallel; without torch.distributed every call is the
single-process identity (reductions leave tensors as they are, gathers return ``[t]``).

Tensors may live anywhere: when the backend cannot reduce them where they are (NCCL and a CPU
tensor) they travel through the backend's device and come back (``comm_device``). Every tensor
handed to torch.distributed passes ``_place`` first; under the ``checked`` backend
(``parallel.checked_backend``) that step is recorded, and a package tensor that skipped it is
refused as NCCL would refuse a CPU tensor. Objects are pickled into tensors here, not by
torch's object collectives, so that their tensors are placed too.
"""
from __future__ import annotations

import hashlib
import pickle
import struct
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_effllm.errors import UserError
from megatron_effllm.layout.dims import ParallelDims
from megatron_effllm.parallel import checked_backend

GroupName = str
GROUPS = ("world", "dp", "tp", "pp", "mp", "embedding")
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class AgreementError(UserError):
    """Ranks hold different values of something they must agree on; nothing was changed."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _model_parallel_ready() -> bool:
    if not is_distributed():
        return False
    from megatron.core import parallel_state as ps

    return ps.model_parallel_is_initialized()


def group(name: GroupName = "world"):
    """The process group called ``name``, or None without torch.distributed (or when the group
    is trivially this process alone: tp/pp/embedding without megatron's groups)."""
    if name not in GROUPS:
        raise ValueError(f"unknown process group {name!r}; one of {', '.join(GROUPS)}")
    if not is_distributed():
        return None
    if name == "world":
        return dist.group.WORLD
    if not _model_parallel_ready():
        return dist.group.WORLD if name == "dp" else None
    from megatron.core import parallel_state as ps

    if name == "dp":
        return ps.get_data_parallel_group()
    if name == "tp":
        return ps.get_tensor_model_parallel_group()
    if name == "pp":
        return ps.get_pipeline_model_parallel_group()
    if name == "mp":
        return ps.get_model_parallel_group()
    return ps.get_embedding_group() if ps.is_rank_in_embedding_group() else None


def size(name: GroupName = "world") -> int:
    g = group(name)
    return 1 if g is None else dist.get_world_size(g)


def rank(name: GroupName = "world") -> int:
    g = group(name)
    return 0 if g is None else dist.get_rank(g)


def dims() -> ParallelDims:
    """This process's ``ParallelDims`` (the single-process default without groups)."""
    return ParallelDims(rank("tp"), size("tp"), rank("pp"), size("pp"), rank("dp"), size("dp"))


def global_rank_in(name: GroupName, group_rank: int) -> int:
    """The global rank of the process at ``group_rank`` in this rank's group ``name``."""
    g = group(name)
    return group_rank if g is None else dist.get_global_rank(g, group_rank)


def in_embedding_group() -> bool:
    return group("embedding") is not None


def pipeline_first_rank() -> int:
    """Global rank of the first pipeline stage of this rank's pipeline."""
    if not _model_parallel_ready():
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_first_rank()


def comm_device(g=None) -> torch.device:
    """Where the backend of group ``g`` reduces tensors: CUDA for NCCL, the CPU otherwise."""
    if is_distributed() and dist.get_backend(g) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _place(t: torch.Tensor, g) -> torch.Tensor:
    """``t`` on the communication device of ``g`` (``t`` itself when it is there already);
    recorded as placed under the checking backend."""
    buf = t.to(comm_device(g))
    return checked_backend.mark_placed(buf) if dist.get_backend(g) == checked_backend.NAME else buf


def _resolve(g: Union[GroupName, object, None]):
    return group(g) if isinstance(g, str) else g


def all_reduce_(t: torch.Tensor, group_name: GroupName = "world", op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group_name`` wherever ``t`` lives; returns ``t``."""
    g = _resolve(group_name)
    if g is None or dist.get_world_size(g) == 1:
        return t
    buf = _place(t, g)
    dist.all_reduce(buf, op=_OPS[op], group=g)
    if buf is not t:
        t.copy_(buf)
    return t


def all_reduce_flat(tensors: Sequence[torch.Tensor], groups: Iterable[GroupName]) -> list[torch.Tensor]:
    """Copies of ``tensors`` summed over each group in turn, one flat message per group (one
    dtype: the first tensor's). Groups of one rank are skipped."""
    resolved = [g for g in map(_resolve, groups) if g is not None and dist.get_world_size(g) > 1]
    if not resolved:
        return [t.clone() for t in tensors]
    dtype = tensors[0].dtype
    flat = _place(torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors]), resolved[0])
    for g in resolved:
        dist.all_reduce(flat, group=g)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        start += t.numel()
    return out


def all_gather(t: torch.Tensor, group_name: GroupName = "world") -> list[torch.Tensor]:
    """Every rank's ``t`` (equal shapes) in group-rank order; ``[t]`` for a one-rank group."""
    g = _resolve(group_name)
    if g is None or dist.get_world_size(g) == 1:
        return [t]
    src = _place(t.contiguous(), g)
    out = [_place(torch.empty_like(src), g) for _ in range(dist.get_world_size(g))]
    dist.all_gather(out, src, group=g)
    return [o.to(t.device) for o in out]


def all_gather_object(obj, group_name: GroupName = "world") -> list:
    """Every rank's picklable ``obj`` in group-rank order; ``[obj]`` for a one-rank group."""
    g = _resolve(group_name)
    if g is None or dist.get_world_size(g) == 1:
        return [obj]
    payload = _pickled(obj)
    sizes = [int(n) for n in all_gather(torch.tensor([payload.numel()]), g)]
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[:payload.numel()] = payload
    return [_unpickled(part[:n]) for part, n in zip(all_gather(padded, g), sizes)]


def broadcast_(t: torch.Tensor, src: int, group_name: GroupName = "world") -> torch.Tensor:
    """In place: ``t`` from global rank ``src`` on every rank of the group."""
    g = _resolve(group_name)
    if g is None or dist.get_world_size(g) == 1:
        return t
    buf = _place(t, g)
    dist.broadcast(buf, src=src, group=g)
    if buf is not t:
        t.copy_(buf)
    return t


def broadcast_object(obj, src: int, group_name: GroupName = "world"):
    """Global rank ``src``'s picklable ``obj`` on every rank of the group (``obj`` elsewhere is
    ignored); ``obj`` itself for a one-rank group."""
    g = _resolve(group_name)
    if g is None or dist.get_world_size(g) == 1:
        return obj
    mine = global_rank() == src
    payload = _pickled(obj) if mine else None
    n = broadcast_(torch.tensor([payload.numel() if mine else 0]), src, g)
    buf = broadcast_(payload if mine else torch.empty(int(n), dtype=torch.uint8), src, g)
    return obj if mine else _unpickled(buf)


def _pickled(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _unpickled(t: torch.Tensor):
    # A peer's payload, as torch's own object collectives unpickle it.
    return pickle.loads(t.numpy().tobytes())


def pipeline_last_rank() -> int:
    """Global rank of the last pipeline stage of this rank's pipeline."""
    if not _model_parallel_ready():
        return 0
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_last_rank()


def barrier(group_name: GroupName = "world") -> None:
    g = _resolve(group_name)
    if g is not None and dist.get_world_size(g) > 1:
        dist.barrier(group=g)


def all_true(flag: bool, group_name: GroupName = "world") -> bool:
    """Whether ``flag`` holds on every rank of the group (collective)."""
    t = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce_(t, group_name, "min").item())


def check_agreement(payload: bytes, what: str, group_name: GroupName = "world",
                    advice: str = "") -> str:
    """Raise ``AgreementError`` on every rank of the group unless all hold the same ``payload``;
    returns its sha256 (hex). The 256-bit digest goes through all-reduce MIN and MAX (equal only
    if every rank has the same); on a mismatch the digests are gathered to name who disagrees."""
    digest = hashlib.sha256(payload).digest()
    g = _resolve(group_name)
    if g is None or dist.get_world_size(g) == 1:
        return digest.hex()
    words = torch.tensor(struct.unpack(">4q", digest), dtype=torch.int64)
    lo, hi = all_reduce_(words.clone(), g, "min"), all_reduce_(words.clone(), g, "max")
    if torch.equal(lo, hi):
        return digest.hex()
    by_digest: dict[str, list[int]] = {}
    for i, w in enumerate(all_gather(words, g)):
        r = dist.get_global_rank(g, i)
        by_digest.setdefault(struct.pack(">4q", *w.tolist()).hex()[:12], []).append(r)
    parts = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {h}"
                      for h, r in sorted(by_digest.items(), key=lambda kv: kv[1]))
    raise AgreementError(f"ranks disagree on {what} (sha256 prefixes {parts}); nothing was changed"
                         + (f". {advice}" if advice else ""))


def global_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def destroy_if(owner: Optional[bool] = True) -> None:
    """Tear the default process group down (the run's own, at its end)."""
    if owner and is_distributed():
        dist.destroy_process_group()
