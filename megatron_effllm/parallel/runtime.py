"""Process groups for megatron-core, and the small runtime support it needs on a CPU-only machine.

megatron-core assumes CUDA in a handful of places on its main path (RNG state, RoPE buffers,
the attention memory buffer, the pipeline schedules). When no GPU exists, ``ensure_cpu_support``
redirects exactly those calls to the CPU; with a GPU present it does nothing, so the same code
runs unchanged on a cluster.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import threading
from typing import Optional

import torch
import torch.cuda.random as cuda_random
import torch.distributed as dist  # creates the process group; collectives go through parallel.comm
from megatron.core import parallel_state
from megatron.core.fusions import fused_softmax
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer import utils as tutils
from torch.overrides import TorchFunctionMode

from megatron_effllm.errors import UserError
from megatron_effllm.log import get_logger
from megatron_effllm.parallel import checked_backend, launch_env

log = get_logger(__name__)

_CPU = torch.device("cpu")
_applied = False
_lock = threading.Lock()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` (and ``.cuda()`` / ``.to("cuda")``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def cpu_device_mode():
    """Context in which device="cuda" allocations land on the CPU when there is no CUDA
    (model construction, which moves tied embeddings across pipeline stages); a null context on
    GPU machines. Only for set-up code: it slows every torch call it covers."""
    return contextlib.nullcontext() if torch.cuda.is_available() else _CudaToCpuMode()


def _cpu_get_rng_state(device="cuda"):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device="cuda"):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    torch.default_generator.manual_seed(int(seed))


def ensure_cpu_support() -> None:
    """Make megatron-core's GPT path run on the CPU when there is no CUDA device.

    Idempotent; a no-op when ``torch.cuda.is_available()``. Covers GPTModel forward/backward,
    ``model_parallel_cuda_manual_seed`` and its RNG tracker, RoPE, the attention memory buffer
    and the pipeline schedules with their point-to-point communication.
    """
    global _applied
    if torch.cuda.is_available():
        return
    with _lock:
        if _applied:
            return
        torch.cuda.current_device = lambda: _CPU
        torch.cuda.synchronize = lambda device=None: None
        for mod in (torch.cuda, cuda_random):
            mod.get_rng_state = _cpu_get_rng_state
            mod.set_rng_state = _cpu_set_rng_state
            mod.manual_seed = _cpu_manual_seed
            mod.manual_seed_all = _cpu_manual_seed
        mp_random._get_cuda_rng_state = (
            lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
        )
        mp_random._set_cuda_rng_state = (
            lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
        )
        _patch_causal_masks()
        _patch_pipeline_schedules()
        _applied = True


def _patch_causal_masks() -> None:
    """Attention's cached causal masks are created with device="cuda"; build them on the CPU.

    These are the only CUDA-only calls on the forward/backward path, so they are patched by
    name instead of routing every torch call through a TorchFunctionMode (which costs about a
    third of the step time on the CPU).
    """

    @functools.lru_cache(maxsize=8)
    def default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()

    @functools.lru_cache(maxsize=8)
    def sliding_window_causal_mask(sq: int, skv: int, window_size: int) -> torch.Tensor:
        with _CudaToCpuMode():
            return _original_sliding(sq, skv, window_size)

    _original_sliding = tutils.get_sliding_window_causal_mask
    for mod in (tutils, fused_softmax):
        mod.get_default_causal_mask = default_causal_mask
        if hasattr(mod, "get_sliding_window_causal_mask"):
            mod.get_sliding_window_causal_mask = sliding_window_causal_mask


def _patch_pipeline_schedules() -> None:
    """The pipeline schedules and their p2p communication allocate with device="cuda" and call
    CUDA streams: run them (only them) under the device-rewriting mode."""

    def on_cpu(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with _CudaToCpuMode():
                return fn(*args, **kwargs)

        return wrapper

    for name in ("forward_backward_no_pipelining", "forward_backward_pipelining_without_interleaving",
                 "forward_backward_pipelining_with_interleaving"):
        if hasattr(schedules, name):
            setattr(schedules, name, on_cpu(getattr(schedules, name)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_S = 1800.0
# Ranks of one job start with skew (node allocation, image pulls, imports on a busy file system):
# the rendezvous waits as long as torchrun's own does, however short the collectives' timeout.
RENDEZVOUS_TIMEOUT_S = 900.0


def comm_timeout_s(default: Optional[float] = None) -> float:
    """How long a collective waits for the other ranks: EFFLLM_COMM_TIMEOUT_S (seconds) when
    set, else ``default`` (the run's parallel.comm_timeout_s), else 30 minutes."""
    raw = os.environ.get("EFFLLM_COMM_TIMEOUT_S")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise UserError(f"EFFLLM_COMM_TIMEOUT_S={raw!r} must be a positive number of seconds")
        return value
    return float(default) if default else DEFAULT_TIMEOUT_S


def limit_cuda_connections(tp: int, sequence_parallel: bool = False) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 under tensor (or sequence) parallelism, as megatron wants: one
    hardware queue, so each layer's communication kernel is scheduled before the compute that
    follows it. CUDA reads it when its context is created, so this runs before the process group
    (and any CUDA call) starts. A value the user set is kept; nothing happens without CUDA."""
    if not (tp > 1 or sequence_parallel) or not torch.cuda.is_available():
        return
    if torch.cuda.is_initialized():
        log.warning("CUDA started before tensor parallelism was set up: CUDA_DEVICE_MAX_CONNECTIONS=1 "
                    "cannot apply any more; export it before starting")
        return
    if os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1") != "1":
        log.warning(f"CUDA_DEVICE_MAX_CONNECTIONS={os.environ['CUDA_DEVICE_MAX_CONNECTIONS']} is kept; megatron's "
                    "tensor parallelism expects 1 (its communication may then wait behind compute)")


def process_group_backend() -> str:
    """NCCL with CUDA, else gloo; ``checked`` (gloo refusing, as NCCL does, package tensors that
    did not go through parallel.comm's placement) with EFFLLM_CHECK_COMM=1 on a CPU machine."""
    flag = os.environ.get("EFFLLM_CHECK_COMM", "")
    if flag not in ("", "0", "1"):
        raise UserError(f"EFFLLM_CHECK_COMM={flag!r} must be 1 (check) or 0")
    if flag != "1":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        raise UserError("EFFLLM_CHECK_COMM=1 checks CPU runs; on a GPU NCCL itself refuses misplaced "
                        "tensors: unset EFFLLM_CHECK_COMM")
    return checked_backend.register()


def _ensure_process_group(timeout_s: Optional[float] = None) -> None:
    if dist.is_initialized():
        return
    backend = process_group_backend()
    # gloo honours the timeout in every collective; NCCL needs its async error handling (on by
    # default since torch 2.2) to abort a collective that waits on a dead rank.
    timeout = datetime.timedelta(seconds=comm_timeout_s(timeout_s))
    identity = launch_env.resolve(os.environ)
    if identity is not None:
        # Started by a launcher (torchrun, deepspeed) or a scheduler (srun, mpirun): the env://
        # rendezvous reads the launcher's variables, derived from the scheduler's when absent.
        os.environ.update(identity)
        wait = datetime.timedelta(seconds=max(RENDEZVOUS_TIMEOUT_S, timeout.total_seconds()))
        store, rank, world_size = next(dist.rendezvous("env://", timeout=wait))
        store.set_timeout(timeout)  # after the rendezvous every wait is a collective's
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=timeout,
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def init_model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234,
                        timeout_s: Optional[float] = None, sequence_parallel: bool = False) -> None:
    """Initialise megatron-core's tensor/pipeline groups on the current torch.distributed world.

    Starts a one-process group first when none exists. Re-initialises when called again with
    different sizes. Seeds megatron's model-parallel RNG tracker (needed by attention).
    ``timeout_s``: how long collectives wait for a peer (see ``comm_timeout_s``). On CUDA with
    tp > 1 or ``sequence_parallel``, sets CUDA_DEVICE_MAX_CONNECTIONS first (``limit_cuda_connections``).
    """
    if tp < 1 or pp < 1:
        raise UserError(f"tensor/pipeline parallel sizes must be >= 1, got tp={tp} pp={pp}")
    limit_cuda_connections(tp, sequence_parallel)
    _ensure_process_group(timeout_s)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise UserError(
            f"world size {world} is not divisible by tp*pp = {tp}*{pp}; "
            "launch a multiple of tp*pp processes"
        )
    ensure_cpu_support()
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        )
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            # The data-parallel group the optimizer and the trainer reduce over has its own.
            distributed_timeout_minutes=comm_timeout_s(timeout_s) / 60.0,
        )
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    """Tear down megatron-core's groups (the torch.distributed world stays)."""
    parallel_state.destroy_model_parallel()
