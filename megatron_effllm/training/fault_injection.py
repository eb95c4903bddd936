"""Faults on demand, for the tests of what a run does when something goes wrong (environment
variables, read at each call):

    EFFLLM_KILL_AT=POINT[@STEP][:RANK]          SIGKILL this process at a named point
    EFFLLM_KILL_SIGNAL=STOP                     SIGSTOP instead (a hung rank, not a dead one);
                                                 TERM or USR1: that signal (a preemption, the
                                                 rank goes on to its next check)
    EFFLLM_INJECT_NONFINITE=KIND@STEP[:RANK],.. KIND loss (NaN loss), grad (finite loss,
                                                 infinite gradients) or weights (a NaN weight
                                                 tensor after the step's update: a finite step
                                                 whose update broke the model; give no RANK);
                                                 each fires once

The points are listed in ``KILL_POINTS``.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch

from megatron_effllm.parallel import comm

KILL_POINTS = (
    "step.end",               # after a step's update, prune event and compaction; before its checkpoint
    "prune.after_event",      # new masks and OBS updates applied in memory, nothing saved
    "compact.after_gather",   # full state gathered and sliced, the old engine still alive
    "compact.after_destroy",  # old engine destroyed, new one not built yet
    "ckpt.after_engine_save",  # the engine's files of the checkpoint written under step_N.partial
    "ckpt.after_manifest",    # manifest written, not renamed yet (rank 0)
    "ckpt.after_rename",      # step_N complete, `latest` not updated yet (rank 0)
    "ckpt.after_latest",      # `latest` updated, older checkpoints not removed yet (rank 0)
)

KILL_SIGNALS = {"KILL": signal.SIGKILL, "STOP": signal.SIGSTOP, "TERM": signal.SIGTERM, "USR1": signal.SIGUSR1}


def _parse(spec: str) -> tuple[str, Optional[int], Optional[int]]:
    rank = None
    if ":" in spec:
        spec, r = spec.rsplit(":", 1)
        rank = int(r)
    step = None
    if "@" in spec:
        spec, s = spec.split("@", 1)
        step = int(s)
    return spec.strip(), step, rank


def kill_point(name: str, step: Optional[int] = None) -> None:
    """SIGKILL (or EFFLLM_KILL_SIGNAL) this process here when EFFLLM_KILL_AT names this point,
    step, rank."""
    spec = os.environ.get("EFFLLM_KILL_AT")
    if not spec:
        return
    point, at_step, rank = _parse(spec)
    if point != name or (at_step is not None and at_step != step) or (rank is not None and rank != comm.global_rank()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    sig = KILL_SIGNALS.get(os.environ.get("EFFLLM_KILL_SIGNAL", "KILL").upper(), signal.SIGKILL)
    os.kill(os.getpid(), sig)


_fired: set = set()


class InfiniteGrad(torch.autograd.Function):
    """Identity forward; infinite gradient backward (a finite loss with inf gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _due(step: int, kinds: tuple) -> Optional[str]:
    """The kind of the first unfired EFFLLM_INJECT_NONFINITE item of ``kinds`` for this step
    and rank (marked fired), or None."""
    spec = os.environ.get("EFFLLM_INJECT_NONFINITE")
    if not spec:
        return None
    for item in spec.split(","):
        kind, at_step, rank = _parse(item)
        key = (spec, kind, at_step, rank)
        if kind not in kinds or at_step != step or key in _fired:
            continue
        if rank is not None and rank != comm.global_rank():
            continue
        _fired.add(key)
        return kind
    return None


def inject_nonfinite(loss: torch.Tensor, step: int) -> torch.Tensor:
    """The loss, made non-finite (or given infinite gradients) where EFFLLM_INJECT_NONFINITE says."""
    kind = _due(step, ("loss", "grad"))
    if kind == "loss":
        return loss * float("nan")
    if kind == "grad":
        return InfiniteGrad.apply(loss)
    return loss


def inject_nonfinite_weights(engine, step: int) -> None:
    """After step ``step``'s update: the model's first weight tensor set to NaN where
    EFFLLM_INJECT_NONFINITE says ``weights@STEP`` (on every rank: the write is collective
    under ZeRO-3)."""
    if _due(step, ("weights",)) is None:
        return
    p = next(engine.module.parameters())
    full = engine.full_fp32_param(p)
    engine.set_full_param(p, torch.full_like(full, float("nan")))
