"""Preemption: SIGTERM or SIGUSR1 on any rank stops every rank at one agreed step boundary with a
checkpoint, and the process exits 0 (slurm's ``--signal=B:USR1@300``, a scheduler's SIGTERM
before it kills the job).

The handler only records the signal (no work inside a signal handler: it may interrupt the
engine, a collective or a checkpoint write). At step boundaries the ranks compare their flags
with one tiny all-reduce (``Watch.requested``), so every rank, signalled or not, stops after the
same step. That all-reduce is a host sync on NCCL, so it is not done after every step: the ranks
check every k steps, k chosen after each check from the slowest rank's time per step since the
previous one so that checks are ``train.preempt_check_s`` seconds apart (every rank computes the
same k from the same reduced numbers). Worst case from the signal to the start of the checkpoint
write: ``preempt_check_s`` plus the step in flight, stretched by steps slower than the previous
window's (a compaction, a held-out evaluation). With the default 30 s that leaves most of slurm's
300 s warning to the checkpoint write. ``preempt_check_s=0`` checks after every step.

SIGINT (Ctrl-C) is left alone: it stops at once with exit code 130 (``cli.train``).
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_effllm.log import get_logger
from megatron_effllm.parallel import comm

log = get_logger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received = 0  # the last preemption signal's number, 0 for none; set by the handler only


def _handler(signum, frame) -> None:
    global _received
    _received = signum


def received() -> int:
    """This rank's pending preemption signal number (0: none)."""
    return _received


@contextlib.contextmanager
def signals():
    """SIGTERM and SIGUSR1 set this process's flag instead of ending it, inside the block
    (the previous handlers come back after it). Outside the main thread signals cannot be
    caught: the block runs without them."""
    global _received
    _received = 0
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Request:
    """A preemption the ranks agreed on: the signal, and the highest rank that received it."""
    signum: int
    rank: int

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class Preempted(Exception):
    """Raised out of the training loop after the preemption checkpoint is complete."""

    def __init__(self, step: int, folder: str, request: Request):
        super().__init__(f"preempted at step {step} ({request.name} on rank {request.rank}); checkpoint "
                         f"at {folder}; restart with resume: auto (the default) to continue from it")
        self.step = step
        self.folder = folder
        self.request = request


class Watch:
    """When the ranks compare their preemption flags, and what they agreed."""

    def __init__(self, check_s: float, start_step: int, clock: Callable[[], float] = time.monotonic):
        self.check_s = check_s
        self.clock = clock
        self.next_check = start_step + 1
        self.last_step = start_step
        self.last_time = clock()

    def requested(self, step: int) -> Optional[Request]:
        """After step ``step``: collective on the check steps (every rank calls it after every
        step); the agreed request, or None."""
        if step < self.next_check:
            return None
        now = self.clock()
        flag = received()
        t = torch.tensor([float(flag), float(comm.global_rank()) if flag else -1.0, now - self.last_time],
                         dtype=torch.float64)
        comm.all_reduce_(t, "world", "max")
        signum, rank, elapsed = int(t[0]), int(t[1]), float(t[2])
        per_step = max(elapsed / (step - self.last_step), 1e-9)
        self.next_check = step + max(1, int(self.check_s / per_step))
        self.last_step, self.last_time = step, now
        return Request(signum, rank) if signum else None


def stop(request: Request, step: int, folder: str, metrics, bar=None) -> None:
    """Every rank, once the agreed step's checkpoint is complete: log where to continue from,
    close the metrics (and progress bar), raise Preempted."""
    if bar is not None:
        bar.close()
    err = Preempted(step, folder, request)
    metrics.log({"kind": "preempted", "step": step, "signal": request.name, "rank": request.rank,
                 "checkpoint": folder})
    metrics.close()
    log.warning(f"[preempt] {err}")
    raise err
