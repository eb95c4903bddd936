"""``checked``: a debugging process-group backend, gloo that refuses tensors as NCCL would.

NCCL reduces CUDA tensors only: a collective on a CPU tensor raises ``No backend type associated
with device type cpu``. On a CPU-only machine every tensor is on the CPU, so a device check
alone could never fail. Instead ``parallel.comm``, under this backend, records every tensor its
placement step produced (on NCCL that step is the ``.to(cuda)``; a weak registry, nothing is
kept alive), and a collective called from this package with a tensor comm did not place raises
NCCL's error. A CPU run with ``EFFLLM_CHECK_COMM=1`` (``parallel.runtime``) thus proves that no
package tensor reaches a collective without going through comm.

Which calls are checked: the caller is the first frame outside torch, its decorators and
``__torch_function__`` handlers.
Calls from this package are; calls from DeepSpeed, megatron-core or any other library pass
unchecked: they place their own tensors (on a GPU their buffers are CUDA already), including
the package tensors handed to their communicating functions (megatron's logits gather).
Object collectives (``broadcast_object_list``, ``all_gather_object``) called from the package
are refused: torch creates their tensors, so comm pickles objects into placed tensors itself.
P2P calls are checked like collectives; the pipeline's P2P is megatron-core's own.
"""
from __future__ import annotations

import sys
import weakref
from collections import Counter
from collections.abc import Iterable

import torch
import torch.distributed as dist

NAME = "checked"
PACKAGE = "megatron_effllm"
# id -> weak reference of every tensor comm placed (a WeakSet would compare tensors with ==).
_placed: dict[int, weakref.ref] = {}


def mark_placed(t: torch.Tensor) -> torch.Tensor:
    """Record ``t`` as on the communication device (comm's placement step); returns ``t``."""
    key = id(t)
    _placed[key] = weakref.ref(t, lambda _, key=key: _placed.pop(key, None))
    return t


def is_placed(t: torch.Tensor) -> bool:
    ref = _placed.get(id(t))
    return ref is not None and ref() is t


_SKIPPED = ("torch", "typing_extensions", "functools", "contextlib", __name__)
_COMM = PACKAGE + ".parallel.comm"
# (comm function or "(direct)", its caller in the package) -> checked calls: what a run exercised.
calls: Counter = Counter()


def _module(f) -> str:
    return f.f_globals.get("__name__", "") if f is not None else ""


def _outside(f, skipped):
    # A torch function mode or tensor subclass forwards someone else's call: not the caller.
    while f is not None and (_module(f) in skipped or _module(f).split(".")[0] in skipped
                             or f.f_code.co_name == "__torch_function__"):
        f = f.f_back
    return f


def _where(f) -> str:
    return f"{f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_qualname}"


def _flat(tensors) -> Iterable[torch.Tensor]:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            yield t
        elif isinstance(t, (list, tuple)):
            yield from _flat(t)


def check(*tensors) -> None:
    """Raise a CUDA-only backend's error for a tensor the package hands to a collective without
    comm's placement; calls from other libraries pass (the caller is the first frame outside
    torch and its decorators)."""
    caller = _outside(sys._getframe(1), _SKIPPED)
    module = _module(caller)
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return
    for t in _flat(tensors):
        if not is_placed(t):
            raise RuntimeError(
                f"No backend type associated with device type {t.device.type} (checking backend: "
                f"a {tuple(t.shape)} {t.dtype} tensor from {_where(caller)} did not go through "
                "parallel.comm's placement on the communication device; a CUDA-only backend "
                "refuses it)")
    by = _outside(caller, (_COMM,)) if module == _COMM else caller
    calls[(caller.f_code.co_name if module == _COMM else "(direct)",
           f"{_module(by)}.{by.f_code.co_qualname}" if by is not None else "?")] += 1


# Every ProcessGroup method that carries tensors (torch 2.13 names, old and new).
_TENSOR_CALLS = (
    "allreduce", "allreduce_coalesced", "reduce", "broadcast", "allgather", "allgather_coalesced",
    "_allgather_base", "all_gather_single", "all_gather_single_coalesced", "allgather_into_tensor_coalesced",
    "gather", "scatter", "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_single",
    "reduce_scatter_single_coalesced", "reduce_scatter_tensor_coalesced", "alltoall", "alltoall_base",
    "all_to_all_single", "send", "recv", "recv_anysource",
)
_PLAIN_CALLS = ("barrier", "monitored_barrier", "_start_coalescing", "_end_coalescing")


def _checked(name: str):
    def call(self, *args, **kwargs):
        check(args, tuple(kwargs.values()))
        return getattr(self._inner, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _forwarded(name: str):
    def call(self, *args, **kwargs):
        return getattr(self._inner, name)(*args, **kwargs)

    call.__name__ = name
    return call


class CheckedProcessGroup(dist.ProcessGroup):
    """A process group whose calls go to a gloo one after ``check``."""

    def __init__(self, store, rank: int, size: int, timeout):
        super().__init__(rank, size)
        self._inner = dist.ProcessGroup(store, rank, size)
        self._inner._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        self._inner._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO,
                                      dist.ProcessGroupGloo(store, rank, size, timeout))

    def getBackendName(self) -> str:
        return NAME

    locals().update({n: _checked(n) for n in _TENSOR_CALLS})
    locals().update({n: _forwarded(n) for n in _PLAIN_CALLS})


def _create(store, rank: int, size: int, timeout) -> CheckedProcessGroup:
    return CheckedProcessGroup(store, rank, size, timeout)


def register() -> str:
    """Make ``checked`` a torch.distributed backend (CPU tensors); returns its name."""
    if NAME not in dist.Backend.backend_list:
        dist.Backend.register_backend(NAME, _create, devices=["cpu"])
    return NAME
