"""What a training run does when something goes wrong in the middle of it.

Non-finite steps. ``StepGuard.finish_step`` replaces a bare ``engine.step()``: when the step's
loss or any gradient is not finite (agreed by every rank), the update is skipped: DeepSpeed runs
its step at the accumulation boundary as usual, so it clears its gradient buffers and partitions
its own way, but the client optimizer's ``step`` does nothing, so weights, Adam moments and the
Adam step count stay as they were. The pruning statistics the step added are put back too, and
learned L0 gates skip their update.
``train.nonfinite_policy`` then decides: ``skip`` goes on and stops after
``train.max_nonfinite`` faulty steps in a row; ``rollback`` goes back to the newest checkpoint
from before the faults instead, keeping the data stream where it is so that the batches that
failed are not seen again (at most ``train.max_rollbacks`` times); ``stop`` stops at the first.

Lost peers. A rank that dies (crash, out-of-memory kill) closes its connections, and a rank
that hangs stops answering; collectives on the others then fail at once or after the process
group's timeout (``parallel.comm_timeout_s``). ``peer_failures()`` turns that error into a
``PeerFailure`` with one line that names the likely cause and the way to continue.

Fault injection for tests (environment variables, read at each call):

    EFFLLM_KILL_AT=POINT[@STEP][:RANK]          SIGKILL this process at a named point
    EFFLLM_KILL_SIGNAL=STOP                     SIGSTOP instead (a hung rank, not a dead one)
    EFFLLM_INJECT_NONFINITE=KIND@STEP[:RANK],.. KIND loss (NaN loss) or grad (finite loss,
                                                 infinite gradients); each fires once

The points are listed in ``KILL_POINTS``.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_effllm.errors import UserError

KILL_POINTS = (
    "step.end",               # after a step's update, prune event and compaction; before its checkpoint
    "prune.after_event",      # new masks and OBS updates applied in memory, nothing saved
    "compact.after_gather",   # full state gathered and sliced, the old engine still alive
    "compact.after_destroy",  # old engine destroyed, new one not built yet
    "ckpt.after_engine_save",  # DeepSpeed files of the checkpoint written under step_N.partial
    "ckpt.after_manifest",    # manifest written, not renamed yet (rank 0)
    "ckpt.after_rename",      # step_N complete, `latest` not updated yet (rank 0)
    "ckpt.after_latest",      # `latest` updated, older checkpoints not removed yet (rank 0)
)


class NonFiniteError(UserError):
    """Non-finite losses or gradients that the configured policy does not tolerate."""


class PeerFailure(RuntimeError):
    """Another rank died or stopped answering; the message is one line."""


class Rollback(Exception):
    """Raised out of the training loop to restart it from ``folder`` with the data stream at
    ``data_state`` (so the batches that failed are not read again)."""

    def __init__(self, folder: str, data_state: dict, first_bad_step: int, step: int):
        super().__init__(f"rollback to {folder}")
        self.folder = folder
        self.data_state = data_state
        self.first_bad_step = first_bad_step
        self.step = step


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---------------------------------------------------------------------------------- injection
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
    """SIGKILL (or SIGSTOP) this process here when EFFLLM_KILL_AT names this point, step, rank."""
    spec = os.environ.get("EFFLLM_KILL_AT")
    if not spec:
        return
    point, at_step, rank = _parse(spec)
    if point != name or (at_step is not None and at_step != step) or (rank is not None and rank != _rank()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    stop = os.environ.get("EFFLLM_KILL_SIGNAL", "KILL").upper() == "STOP"
    os.kill(os.getpid(), signal.SIGSTOP if stop else signal.SIGKILL)


_fired: set = set()


class _InfiniteGrad(torch.autograd.Function):
    """Identity forward; infinite gradient backward (a finite loss with inf gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def inject_nonfinite(loss: torch.Tensor, step: int) -> torch.Tensor:
    """The loss, made non-finite (or given infinite gradients) where EFFLLM_INJECT_NONFINITE says."""
    spec = os.environ.get("EFFLLM_INJECT_NONFINITE")
    if not spec:
        return loss
    for item in spec.split(","):
        kind, at_step, rank = _parse(item)
        key = (spec, kind, at_step, rank)
        if at_step != step or (rank is not None and rank != _rank()) or key in _fired:
            continue
        _fired.add(key)
        if kind == "loss":
            return loss * float("nan")
        if kind == "grad":
            return _InfiniteGrad.apply(loss)
    return loss


# ---------------------------------------------------------------------------------- steps
def grads_finite(engine) -> bool:
    """Whether every gradient the coming optimizer step would apply is finite (collective).

    Under ZeRO the optimizer checks its own reduced partitions and agrees over the data- and
    model-parallel groups (DeepSpeed's fp16 overflow check); otherwise the module's ``.grad``
    tensors are checked and the flag is all-reduced.
    """
    opt = engine.optimizer
    if engine.zero_optimization_stage() > 0 and hasattr(opt, "has_overflow"):
        return not opt.has_overflow(partition_gradients=getattr(opt, "partition_gradients", True))
    from deepspeed.runtime.utils import has_inf_or_nan

    device = next(engine.module.parameters()).device  # NCCL reduces device tensors only
    flag = torch.zeros(1, device=device)
    for p in engine.module.parameters():
        if p.grad is not None:  # no host sync per tensor: the flag stays on the device
            flag = torch.maximum(flag, has_inf_or_nan(p.grad).float().reshape(1).to(device))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def skip_update(engine) -> None:
    """DeepSpeed's step at the accumulation boundary with the client optimizer's update turned
    off: gradients are cleared as after any step, parameters and optimizer state stay."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    own = inner.__dict__.get("step")  # e.g. a scheduler's wrapper; put back afterwards
    inner.step = lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        if own is not None:
            inner.step = own
        else:
            del inner.step


def _pruning_statistics(pruning) -> dict:
    return {"saliency": pruning.saliency.state, "hessians": pruning.hessians.state,
            "layer_cos": pruning.layer_cos}


class StepGuard:
    """Applies or skips each step's update and enforces ``train.nonfinite_policy``."""

    def __init__(self, train_cfg, ckpt_root: str, *, rollbacks_done: int = 0,
                 log: Callable[[str], None] = print, metrics=None):
        self.policy = train_cfg.nonfinite_policy
        self.max_in_row = train_cfg.max_nonfinite
        self.max_rollbacks = train_cfg.max_rollbacks
        self.rollbacks_done = rollbacks_done
        self.ckpt_root = ckpt_root
        self.log = log
        self.metrics = metrics
        self.in_row = 0
        self.first_bad: Optional[int] = None
        self._saved: Optional[dict] = None

    def begin_step(self, pruning, collecting: bool) -> None:
        """Before the step's pruning bookkeeping: keep what a skipped step must put back."""
        # Only while pruning collects statistics does a step change them.
        self._saved = None
        if collecting and pruning.enabled:
            stats = _pruning_statistics(pruning)
            self._saved = {
                "saliency": {k: v.clone() for k, v in stats["saliency"].items()},
                "hessians": {k: v.clone() for k, v in stats["hessians"].items()},
                "layer_cos": stats["layer_cos"].clone(),
            }

    def finish_step(self, engine, pruning, step: int, loss: float, data_iter) -> bool:
        """Apply the step's update (True) or skip it (False); raise per the policy."""
        loss_ok = math.isfinite(loss)
        grads_ok = grads_finite(engine)  # collective: always called, on every rank
        if loss_ok and grads_ok:
            engine.step()
            self.in_row, self.first_bad, self._saved = 0, None, None
            return True
        skip_update(engine)
        pruning.discard_step()  # learned gates (L0Runtime) drop the step's gradients too
        if self._saved is not None:
            pruning.saliency.state = self._saved["saliency"]
            pruning.hessians.state = self._saved["hessians"]
            pruning.layer_cos = self._saved["layer_cos"]
            self._saved = None
        self.in_row += 1
        self.first_bad = self.first_bad or step
        what = f"loss ({loss})" if not loss_ok else "gradient"
        if self.metrics is not None:
            self.metrics.log({"kind": "fault", "step": step, "what": "loss" if not loss_ok else "gradient",
                              "loss": str(loss), "in_row": self.in_row})
        self.log(f"[fault] step {step}: non-finite {what}, update skipped ({self.in_row} in a row)")
        advice = "lower optim.lr, raise optim.warmup_steps or optim.clip_grad, or check the data"
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite {what} at step {step} (train.nonfinite_policy=stop); {advice}")
        if self.in_row < self.max_in_row:
            return False
        streak = (f"non-finite loss or gradients in {self.in_row} steps in a row ({self.first_bad}-{step})"
                  if self.in_row > 1 else f"non-finite {what} at step {step}")
        if self.policy == "skip":
            raise NonFiniteError(f"{streak} (train.max_nonfinite={self.max_in_row}); {advice}, or set "
                                 "train.nonfinite_policy=rollback")
        if self.rollbacks_done >= self.max_rollbacks:
            raise NonFiniteError(f"{streak}, after {self.rollbacks_done} rollbacks "
                                 f"(train.max_rollbacks={self.max_rollbacks}); {advice}")
        from megatron_effllm.training import checkpoint as ckpt

        folder = ckpt.find_resumable(self.ckpt_root, log=self.log, before_step=self.first_bad)
        if folder is None:
            raise NonFiniteError(f"{streak} and no checkpoint from before step {self.first_bad} to "
                                 f"roll back to; {advice}")
        if self.metrics is not None:
            self.metrics.log({"kind": "rollback", "step": step, "to": os.path.basename(folder)})
        self.log(f"[fault] {streak}: rolling back to {folder}; the data stream skips the failed batches")
        state = data_iter.state_dict()
        pruning.remove_hooks()
        engine.destroy()
        raise Rollback(folder, state, self.first_bad, step)


# ---------------------------------------------------------------------------------- lost peers
_COMM_MARKERS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer",
                 "broken pipe", "c10d", "socket timeout")


def is_comm_failure(err: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    if isinstance(err, RuntimeError):
        msg = str(err).lower()
        return any(m in msg for m in _COMM_MARKERS)
    return False


def describe_comm_failure(err: BaseException, timeout_s: Optional[float] = None) -> str:
    msg = str(err).lower()
    who = "this rank"
    if dist.is_available() and dist.is_initialized():
        who = f"rank {dist.get_rank()} of {dist.get_world_size()}"
    if "timed out" in msg or "timeout" in msg:
        limit = f" within {timeout_s:g} s (parallel.comm_timeout_s)" if timeout_s else ""
        cause = (f"no answer from another rank{limit}: a peer hung, was stopped or is far behind "
                 "(a slow filesystem or a stuck data loader)")
    else:
        cause = ("a peer process closed its connection: it most likely crashed or was killed "
                 "(out of memory, a node failure or a signal)")
    return (f"{who} lost contact with the other ranks: {cause}; see the other ranks' logs for the "
            "first error, then restart the job with resume: auto to continue from the last complete "
            "checkpoint")


@contextlib.contextmanager
def peer_failures(timeout_s: Optional[float] = None):
    """Turn a collective that failed because of another rank into a one-line PeerFailure."""
    try:
        yield
    except (UserError, PeerFailure, Rollback):
        raise
    except Exception as err:
        if is_comm_failure(err):
            raise PeerFailure(describe_comm_failure(err, timeout_s)) from None
        raise
