"""What a training run does when something goes wrong in the middle of it.

Non-finite steps. ``StepGuard.finish_step`` replaces a bare ``engine.step()``: when the step's
loss or any gradient is not finite (agreed by every rank), the update is skipped
(``TrainEngine.step_unless``: gradients cleared as after any step; weights, Adam moments and the
Adam step count stay as they were). The pruning statistics the step added are put back too
(``end_step``), and learned L0 gates skip their update. All of this is decided on the device;
the host reads the outcome at the next step that logs, prunes or saves (``StepGuard.resolve``).
``train.nonfinite_policy`` then decides: ``skip`` goes on and stops after
``train.max_nonfinite`` faulty steps in a row; ``rollback`` goes back to the newest checkpoint
from before the faults instead, keeping the data stream where it is so that the batches that
failed are not seen again (at most ``train.max_rollbacks`` times); ``stop`` stops at the first.

Non-finite results. A run that ends with non-finite weights or held-out losses exports
nothing (``check_final_model``): it stops with one line naming the checkpoints it kept.

Lost peers. A rank that dies (crash, out-of-memory kill) closes its connections, and a rank
that hangs stops answering; collectives on the others then fail at once or after the process
group's timeout (``parallel.comm_timeout_s``). ``peer_failures()`` turns that error into a
``PeerFailure`` with one line that names the likely cause and the way to continue.

Faults can be injected on demand for tests (``fault_injection``).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from typing import Optional

import torch
import torch.distributed as dist  # its error type only: collectives go through parallel.comm

from megatron_effllm.engine.base import TrainEngine
from megatron_effllm.errors import UserError
from megatron_effllm.log import get_logger
from megatron_effllm.parallel import comm
from megatron_effllm.training import checkpoint as ckpt

log = get_logger(__name__)


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


# ---------------------------------------------------------------------------------- steps
class StepGuard:
    """Applies or skips each step's update and enforces ``train.nonfinite_policy``.

    The decision is taken on the device (``finish_step``: no host read, so the host can queue the
    next step's work at once); the host learns of it at the next step that reads anything anyway
    (``resolve``: a log line, a prune event, an evaluation, a checkpoint), in one read for all the
    steps since, and then counts, logs and raises as if it had looked after every step. A run that
    stops or rolls back does so at that step, naming the steps that failed; nothing of the steps in
    between is saved (a checkpoint resolves first)."""

    def __init__(self, train_cfg, ckpt_root: str, *, rollbacks_done: int = 0, metrics=None):
        self.policy = train_cfg.nonfinite_policy
        self.max_in_row = train_cfg.max_nonfinite
        self.max_rollbacks = train_cfg.max_rollbacks
        self.rollbacks_done = rollbacks_done
        self.ckpt_root = ckpt_root
        self.metrics = metrics
        self.in_row = 0
        self.first_bad: Optional[int] = None
        self.last_loss = float("nan")
        # (step, skipped flag, loss; both on the device, data state after the step or None)
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, Optional[dict]]] = []

    def finish_step(self, engine: TrainEngine, pruning, step: int, loss: torch.Tensor, data_iter) -> None:
        """Apply step ``step``'s update, or skip it when its loss (``loss``: the mean over every
        rank, on the device) or any gradient is not finite, keeping or putting back the pruning
        statistics it added; all of it on the device."""
        loss = loss.detach().reshape(())
        skipped = engine.step_unless(~torch.isfinite(loss))
        pruning.end_step(skipped)
        # the data stream a rollback at this step goes on from (host bookkeeping only)
        data_state = data_iter.state_dict() if self.policy == "rollback" else None
        self._pending.append((step, skipped, loss, data_state))

    def resolve(self, engine: TrainEngine, pruning) -> float:
        """Read the outcome of every step since the last call (one host read) and act on it:
        count, log, raise per the policy. Returns the last step's loss."""
        if not self._pending:
            return self.last_loss
        pending, self._pending = self._pending, []
        read = torch.stack([torch.stack([s.reshape(()).double(), l.double()]) for _, s, l, _ in pending])
        for n, ((step, _, _, data_state), (skipped, loss)) in enumerate(zip(pending, read.tolist())):
            self.last_loss = loss
            if not skipped:
                self.in_row, self.first_bad = 0, None
                continue
            if n == len(pending) - 1:  # what a skipped step leaves for the prune event that follows
                pruning.discard_step()
            self._skipped(engine, pruning, step, loss, data_state)
        return self.last_loss

    def _skipped(self, engine: TrainEngine, pruning, step: int, loss: float, data_state: Optional[dict]) -> None:
        loss_ok = math.isfinite(loss)
        self.in_row += 1
        self.first_bad = self.first_bad or step
        what = f"loss ({loss})" if not loss_ok else "gradient"
        if self.metrics is not None:
            self.metrics.log({"kind": "fault", "step": step, "what": "loss" if not loss_ok else "gradient",
                              "loss": str(loss), "in_row": self.in_row})
        log.warning(f"[fault] step {step}: non-finite {what}, update skipped ({self.in_row} in a row)")
        advice = "lower optim.lr, raise optim.warmup_steps or optim.clip_grad, or check the data"
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite {what} at step {step} (train.nonfinite_policy=stop); {advice}")
        if self.in_row < self.max_in_row:
            return
        streak = (f"non-finite loss or gradients in {self.in_row} steps in a row ({self.first_bad}-{step})"
                  if self.in_row > 1 else f"non-finite {what} at step {step}")
        if self.policy == "skip":
            raise NonFiniteError(f"{streak} (train.max_nonfinite={self.max_in_row}); {advice}, or set "
                                 "train.nonfinite_policy=rollback")
        if self.rollbacks_done >= self.max_rollbacks:
            raise NonFiniteError(f"{streak}, after {self.rollbacks_done} rollbacks "
                                 f"(train.max_rollbacks={self.max_rollbacks}); {advice}")
        folder = ckpt.find_resumable(self.ckpt_root, before_step=self.first_bad)
        if folder is None:
            raise NonFiniteError(f"{streak} and no checkpoint from before step {self.first_bad} to "
                                 f"roll back to; {advice}")
        if self.metrics is not None:
            self.metrics.log({"kind": "rollback", "step": step, "to": os.path.basename(folder)})
        log.warning(f"[fault] {streak}: rolling back to {folder}; the data stream skips the failed batches")
        pruning.remove_hooks()
        engine.destroy()
        raise Rollback(folder, data_state, self.first_bad, step)


def check_final_model(canonical: dict, heldout: dict, final_dir: str, ckpt_root: str) -> None:
    """Refuse to export a trained model with non-finite weights or held-out losses (one line:
    what is wrong, that nothing was exported, which checkpoints are kept)."""
    weights = [k for k, v in canonical.items() if not bool(torch.isfinite(v).all())]
    losses = {d: v for d, v in heldout.items() if not math.isfinite(v)}
    if not weights and not losses:
        return
    what = []
    if weights:
        what.append(f"NaN/inf in {len(weights)} weight tensor{'s' if len(weights) > 1 else ''} "
                    f"(first {weights[0]})")
    if losses:
        what.append("held-out loss " + ", ".join(f"{v} on {d}" for d, v in losses.items()))
    kept = [os.path.basename(f) for _, f in ckpt.step_dirs(ckpt_root)]
    if kept:
        where = (f"the checkpoints {', '.join(reversed(kept))} in {ckpt_root} are kept (the newest "
                 "holds this model): resume from an earlier one (resume=<its folder>)")
    else:
        where = "no checkpoint was kept: start again"
    raise NonFiniteError(f"the trained model is not finite ({'; '.join(what)}); nothing was exported to "
                         f"{final_dir}; {where} with a lower optim.lr or a higher optim.warmup_steps, "
                         "or check the data")


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


def describe_comm_failure(err: BaseException, timeout_s: Optional[float] = None,
                          traceback_file: Optional[str] = None) -> str:
    """One line: who lost whom, the likely cause, the original error's type and first line
    (an InfiniBand, interface or NCCL out-of-memory error must stay recognisable), where its
    full traceback is, and how to continue."""
    msg = str(err).lower()
    who = "this rank"
    if comm.is_distributed():
        who = f"rank {comm.global_rank()} of {comm.world_size()}"
    if "timed out" in msg or "timeout" in msg:
        limit = f" within {timeout_s:g} s (parallel.comm_timeout_s)" if timeout_s else ""
        cause = (f"no answer from another rank{limit}: a peer hung, was stopped or is far behind "
                 "(a slow filesystem or a stuck data loader)")
    else:
        cause = ("a peer process closed its connection: it most likely crashed or was killed "
                 "(out of memory, a node failure or a signal)")
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    original = f"{type(err).__name__}: {first[:200]}" + (f", full traceback in {traceback_file}"
                                                         if traceback_file else "")
    return (f"{who} lost contact with the other ranks: {cause} ({original}); see the other ranks' logs "
            "for the first error, then restart the job with resume: auto to continue from the last "
            "complete checkpoint")


def _write_traceback(log_dir: Optional[str]) -> Optional[str]:
    """The current exception's full traceback appended to ``log_dir/rank_N.log``; its path, or
    None when it cannot be written (the one-line message must not fail for it)."""
    if not log_dir:
        return None
    path = os.path.join(log_dir, f"rank_{comm.global_rank()}.log")
    try:
        os.makedirs(log_dir, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} lost peer\n{traceback.format_exc()}\n")
    except OSError:
        return None
    return path


@contextlib.contextmanager
def peer_failures(timeout_s: Optional[float] = None, log_dir: Optional[str] = None):
    """Turn a collective that failed because of another rank into a one-line PeerFailure; the
    original traceback goes to ``log_dir/rank_N.log`` (the run's ``logs/``)."""
    try:
        yield
    except (UserError, PeerFailure, Rollback):
        raise
    except Exception as err:
        if is_comm_failure(err):
            raise PeerFailure(describe_comm_failure(err, timeout_s, _write_traceback(log_dir))) from None
        raise
