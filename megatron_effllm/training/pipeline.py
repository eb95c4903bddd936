"""Pipeline-parallel training steps (parallel.pp > 1) for a megatron-core GPTModel stage inside a
training engine (DeepSpeed ZeRO).

The schedule is megatron's non-interleaved 1F1B (warm-up forwards, steady one-forward-one-
backward, cool-down backwards; at most ``pp - stage`` micro-batches in flight per stage) over
megatron-core's own point-to-point communication (``P2PCommunicator``). What differs from
megatron-core's ``forward_backward_pipelining_without_interleaving`` is where the gradients go:

- each micro-batch's backward is ``torch.autograd.grad`` over this stage's parameters (and the
  activation it received), accumulated into fp32 buffers. Tensor hooks on parameters (the
  pruning runtime's saliency) see every micro-batch's gradient exactly as at PP=1; DeepSpeed's
  post-accumulate hooks do not fire, so ZeRO-2 does not reduce or free anything mid-schedule;
- after the last micro-batch the two copies of a tied embedding (first and last stage) get the
  sum of their gradients over megatron's embedding group, as megatron's finalize_model_grads
  does, and one ``engine.backward(sum(p * g))`` hands exactly ``g`` to the engine: ZeRO's
  gradient hooks, its data-parallel reduction and the accumulation boundary run as for any
  backward, on any ZeRO stage that supports pipelines (1, 2).

With online distillation (``teacher``) the frozen teacher runs inside the same schedule: each
stage forwards micro-batch k through its teacher stage (no autograd) when it forwards the
student's, and the send to the next stage carries both hidden states in one tensor
``[s, b, h_student + h_teacher]`` (gradients flow back for the student's part only). The last
stage so has the teacher's vocabulary-parallel logits exactly when the student's loss needs them,
one micro-batch at a time. A separate forward-only teacher pass before the student's schedule
would give the same logits but hold all ``m`` micro-batches' ``[b, s, V / TP]`` logits on the last
stage (the vocabulary dwarfs the hidden size) and add its own pipeline fill and drain.

Why not megatron-core's schedules as they are: their backward is ``torch.autograd.backward``
per micro-batch and their gradient finalisation expects megatron's DDP wrapper; under ZeRO-2
every micro-batch would be reduced and the embedding copies could not be summed before ZeRO
takes their gradients. Why not DeepSpeed's PipelineEngine: it wants the model as a
PipelineModule (a list of layers), not megatron-core's GPTModel, and refuses ZeRO-2.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from megatron_effllm.engine.base import TrainEngine
from megatron_effllm.parallel import comm
from megatron_effllm.training.teacher import Teacher


def mean_token_loss(per_token: torch.Tensor, batch: dict) -> torch.Tensor:
    """A micro-batch's loss: the mean over its loss-masked tokens (any pipeline layout)."""
    mask = batch["loss_mask"].to(per_token.device).float()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def _communicator(module: torch.nn.Module, dtype: torch.dtype):
    """megatron-core's P2P communicator over this pipeline, receiving tensors of ``dtype``."""
    config = copy.copy(module.config)  # the model's own config stays untouched
    config.pipeline_dtype = dtype
    config.variable_seq_lengths = False
    config.timers = None
    return P2PCommunicator(pp_group=comm.group("pp"), config=config)


def _stage_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def tied_embedding_weight(module: torch.nn.Module) -> Optional[torch.nn.Parameter]:
    """This stage's copy of a tied embedding (first stage: the embedding, last stage: the output
    layer's weight); None without tying or on a middle stage."""
    if not getattr(module, "share_embeddings_and_output_weights", False):
        return None
    if comm.size("pp") == 1 or not comm.in_embedding_group():
        return None
    return module.shared_embedding_or_output_weight()


def mark_replicated_copies(module: torch.nn.Module) -> None:
    """Tell DeepSpeed's gradient-norm computation that the last stage's copy of a tied embedding
    duplicates the first stage's (counted once, as megatron's clipping does)."""
    dims = comm.dims()
    if dims.pp == 1 or dims.first_stage:
        return
    w = tied_embedding_weight(module)
    if w is not None:
        w.ds_pipe_replicated = True


class PipelineStep:
    """One global batch's micro-batches on this stage: ``train`` (1F1B, gradients handed to the
    engine once) and ``forward`` (held-out evaluation, one micro-batch through every stage)."""

    def __init__(self, seq_len: int, micro_batch: int):
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self._comm_dtype, self._comm = None, None

    def _communicator(self, module):
        """The P2P communicator, made once: it depends on the pipeline group and the dtype it
        receives only (shapes are passed per call, so a compaction's new widths need no new one)."""
        dtype = _stage_dtype(module)
        if dtype != self._comm_dtype:
            self._comm_dtype, self._comm = dtype, _communicator(module, dtype)
        return self._comm

    def _shape(self, module) -> tuple[int, int, int]:
        return (self.seq_len, self.micro_batch, module.config.hidden_size)

    # ------------------------------------------------------------------ one micro-batch
    @staticmethod
    def _forward(module, batch: dict, x: Optional[torch.Tensor], logits: bool = False):
        """This stage's forward of one micro-batch: hidden states (middle) or per-token loss (last;
        the vocabulary-parallel logits ``[b, s, V / TP]`` with ``logits``).

        The module itself, not the engine: DeepSpeed's engine forward hooks the outputs so that
        its backward epilogue would run inside every ``torch.autograd.grad``."""
        device = next(module.parameters()).device
        module.set_input_tensor(x)
        tokens = batch["tokens"].to(device) if ps.is_pipeline_first_stage() else None
        positions = batch["position_ids"].to(device)
        labels = batch["labels"].to(device) if ps.is_pipeline_last_stage() and not logits else None
        return module(tokens, positions, None, labels=labels)

    def _distill_forward(self, module, teacher: Teacher, batch: dict, x_student: Optional[torch.Tensor],
                         x_teacher: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Student and teacher stage forwards of one micro-batch: (the student's hidden states,
        the teacher's) on a middle stage, (the per-token distillation loss, None) on the last."""
        last = ps.is_pipeline_last_stage()
        out = self._forward(module, batch, x_student, logits=last)
        with torch.no_grad():
            t_out = self._forward(teacher.model, batch, x_teacher, logits=last)
        if not last:
            return out, t_out
        return teacher.mix(out, t_out, batch["labels"].to(out.device)), None

    # ------------------------------------------------------------------ training
    def train(
        self,
        engine: TrainEngine,
        batches: Sequence[dict],
        *,
        loss_hook: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        extra_leaves: Sequence[torch.Tensor] = (),
        teacher: Optional[Teacher] = None,
        paused: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        after_micro_batch: Callable[[dict], None] = lambda b: None,
        before_backward: Callable[[dict], None] = lambda b: None,
        after_schedule: Callable[[], None] = lambda: None,
    ) -> torch.Tensor:
        """Forward and backward of ``batches`` (this data-parallel rank's micro-batches of one
        step), then the gradients into ``engine`` (ready for ``engine.step()``). Returns the mean
        micro-batch loss, equal on every rank of the pipeline.

        ``loss_hook`` sees each micro-batch loss on the last stage (fault injection);
        ``extra_leaves`` are non-parameter leaves whose ``.grad`` accumulates as under a plain
        backward (L0 gates); ``teacher`` (distillation, same dtype) runs its stage beside this
        one and the last stage's loss mixes KD and LM; ``paused()`` is a context in which the
        pruning runtime's hooks do not record (the hand-over backward); ``after_micro_batch(batch)`` runs after each
        micro-batch's backward on every stage, ``before_backward(batch)`` before it;
        ``after_schedule()`` after the last one (every rank).
        """
        module = engine.module
        dims = comm.dims()
        first, last = dims.first_stage, dims.last_stage
        stage, stages = dims.pp_rank, dims.pp
        p2p = self._communicator(module)
        shape = self._shape(module)  # the gradients sent back: the student's hidden states only
        h = shape[-1]
        # the activations sent forward: with a teacher, its hidden states after the student's
        fwd_shape = shape if teacher is None else shape[:-1] + (h + teacher.model.config.hidden_size,)
        m = len(batches)
        params = [p for p in module.parameters() if p.requires_grad]
        leaves = params + list(extra_leaves)
        acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in leaves]
        losses: list[torch.Tensor] = []
        in_flight: list[tuple[Optional[torch.Tensor], torch.Tensor, dict]] = []

        def forward(k: int, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            """The micro-batch's forward; returns what goes to the next stage."""
            if teacher is None:
                if x is not None:
                    x.requires_grad_(True)
                out = self._forward(module, batches[k], x)
                send = None if last else out.detach()
            else:  # the student's part a leaf of its own: the gradient sent back has its width
                x_t = None
                if x is not None:
                    x, x_t = x[..., :h].contiguous().requires_grad_(True), x[..., h:].contiguous()
                out, t_out = self._distill_forward(module, teacher, batches[k], x, x_t)
                send = None if last else torch.cat([out.detach(), t_out], dim=-1)
            if last:
                loss = loss_hook(mean_token_loss(out, batches[k]))
                losses.append(loss.detach().float())
                out = loss / m  # as the engine's loss scaling for gradient accumulation
            in_flight.append((x, out, batches[k]))
            return send

        def backward(grad_out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            x, out, batch = in_flight.pop(0)
            before_backward(batch)
            inputs = leaves + ([x] if x is not None else [])
            grads = torch.autograd.grad(out, inputs, grad_outputs=None if last else grad_out,
                                        allow_unused=True)
            for buf, g in zip(acc, grads[:len(leaves)]):
                if g is not None:
                    buf.add_(g.float())
            after_micro_batch(batch)
            return grads[-1] if x is not None else None

        warmup = min(stages - stage - 1, m)
        for k in range(warmup):
            p2p.send_forward(forward(k, p2p.recv_forward(fwd_shape, first)), last)
        x = p2p.recv_forward(fwd_shape, first) if warmup < m else None
        for k in range(warmup, m):
            grad_out = p2p.send_forward_recv_backward(forward(k, x), shape, last)
            grad_in = backward(grad_out)
            if k == m - 1:
                x = None
                p2p.send_backward(grad_in, first)
            else:
                x = p2p.send_backward_recv_forward(grad_in, fwd_shape, first)
        for _ in range(warmup):
            p2p.send_backward(backward(p2p.recv_backward(shape, last)), first)

        after_schedule()
        # The tied embedding's two copies (first / last stage) each hold the gradient of one use.
        tied = tied_embedding_weight(module)
        if tied is not None:
            i = next(j for j, p in enumerate(params) if p is tied)
            comm.all_reduce_(acc[i], "embedding")
        for leaf, buf in zip(leaves[len(params):], acc[len(params):]):
            leaf.grad = buf.to(leaf.dtype) if leaf.grad is None else leaf.grad + buf.to(leaf.dtype)
        # Hand the gradients to the engine: d/dp sum(p * g) = g exactly, through ZeRO's hooks.
        with paused():
            surrogate = sum((p * g.to(p.dtype)).sum() for p, g in zip(params, acc[:len(params)]))
            acc.clear()  # the fp32 buffers go before the engine allocates its own
            engine.backward(surrogate, last_micro_batch=True, scale_with_accumulation=False)
        mean = torch.stack(losses).mean() if last else torch.zeros((), dtype=torch.float32)
        return broadcast_from_last_stage(mean.to(next(module.parameters()).device))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def forward(self, module, batch: dict) -> Optional[torch.Tensor]:
        """Per-token loss [b, s] of one micro-batch on the last stage (None on the others)."""
        dims = comm.dims()
        first, last = dims.first_stage, dims.last_stage
        p2p = self._communicator(module)
        shape = (batch["tokens"].shape[1], batch["tokens"].shape[0], module.config.hidden_size)
        x = p2p.recv_forward(shape, first)
        out = self._forward(module, batch, x)
        p2p.send_forward(None if last else out, last)
        return out if last else None


def broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's ``t`` on every stage of this pipeline."""
    if comm.size("pp") > 1:
        comm.broadcast_(t, ps.get_pipeline_model_parallel_last_rank(), "pp")
    return t
