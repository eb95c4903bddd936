"""The protocol every training engine implements (DeepSpeed ZeRO today; torch FSDP2 would be a
second implementation of the same methods).

The pruning runtimes need three things from an engine beyond forward/backward/step: a
parameter's full fp32 master value (OBS reads it), a way to write a full value back into every
copy the engine keeps (the module's weight, the fp32 master, partitions), and, for engines that
partition parameters between uses (ZeRO-3), the rank-local partition of a parameter so that
masks reach the copy the next gather reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class EngineOptions:
    """What any engine is built with: the batch split, how state is partitioned over data
    parallelism, precision, clipping, and the AdamW optimizer's settings."""

    micro_batch: int
    grad_accum: int = 1
    zero_stage: int = 0
    """0: replicated; 1: optimizer state partitioned; 2: and gradients; 3: and parameters."""
    bf16: bool = False
    """bf16 weights and activations over fp32 masters (fp32 throughout when False). The model
    comes built in bf16; the masters are made from it (``set_full_param`` writes exact ones)."""
    fp32_grad_accum: bool = False
    """With bf16: gradients summed over micro-batches in fp32 (ZeRO stages 1-3)."""
    overlap_comm: Optional[bool] = None
    """ZeRO on CUDA: reduce gradients while the backward runs (None: the engine's own default)."""
    clip_grad: float = 0.0
    """Global gradient-norm clipping threshold (0: none)."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    """On matrices only; norms and biases (1-D parameters) are not decayed."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@runtime_checkable
class TrainEngine(Protocol):
    """A model wrapped for data-parallel training with an optimizer."""

    name: str  # its key in ``megatron_effllm.engine.ENGINES``
    module: torch.nn.Module
    options: EngineOptions

    def __call__(self, *args, **kwargs) -> Any:
        """The wrapped module's forward, through the engine (which may gather parameters)."""

    # --- the step -----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool, scale_with_accumulation: bool = True) -> None:
        """Backward of one micro-batch's loss; ``last_micro_batch`` ends the accumulation
        window (gradient reduction happens there)."""

    def step(self) -> None:
        """Clip, reduce and apply the accumulated gradients, then clear them."""

    def step_unless(self, bad: torch.Tensor) -> torch.Tensor:
        """``step()``, or, when ``bad`` (a device flag) is set on any rank or a gradient the step
        applies is not finite, end the accumulation window without applying it (gradients
        cleared; weights, optimizer state and its step count kept). Decided on the device, with
        no host read; returns the agreed flag (1.0: skipped) on the device."""

    def set_learning_rate(self, lr: float) -> None: ...

    def learning_rate(self) -> float: ...

    def optimizer_step_count(self) -> int: ...

    def grad_norm(self) -> float:
        """The global gradient norm of the last step (before clipping)."""

    def zero_stage(self) -> int:
        """How state is partitioned over data parallelism (``EngineOptions.zero_stage``); at 3 a
        forward gathers parameters collectively, so every data-parallel rank must run it."""

    # --- parameters ---------------------------------------------------------------------
    def full_fp32_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        """``p``'s full fp32 master value (the weight itself when the engine keeps no master)."""

    def set_full_param(self, p: torch.nn.Parameter, full: torch.Tensor) -> None:
        """Write ``full`` into every copy of ``p`` the engine keeps (weight, master, partition)."""

    def is_partitioned(self, p: torch.nn.Parameter) -> bool:
        """Whether ``p``'s data lives in a rank-local partition between uses (ZeRO-3)."""

    def local_partition(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The rank-local partition tensor of a partitioned ``p`` (to mask in place)."""

    def local_part_of(self, full: torch.Tensor, p: torch.nn.Parameter, fill: float = 0.0) -> torch.Tensor:
        """This rank's partition of a full tensor shaped like ``p`` (padding filled with ``fill``)."""

    def gathered(self, params: Optional[list] = None):
        """Context manager: the listed (default: all) parameters whole inside it."""

    # --- state --------------------------------------------------------------------------
    def iter_full_state(self, with_moments: bool = True) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(param name, {"param": fp32 master, "exp_avg", "exp_avg_sq"}) full over data
        parallelism, one parameter at a time (collective: every rank consumes all of it)."""

    def gather_full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """``iter_full_state`` as one dict."""

    def rebuild(self, build_model: Callable[[], torch.nn.Module], slice_state: Callable[[Iterator], Iterator], *,
                carry_optimizer_state: bool = True,
                after_destroy: Callable[[], None] = lambda: None) -> "TrainEngine":
        """An engine over ``build_model()`` (new shapes, built in the training dtype) whose
        state, fp32 masters exact, is ``slice_state`` of this one's ``iter_full_state``; this
        engine is destroyed and its memory released first, the sliced state held one parameter
        per data-parallel rank in between (collective; ``after_destroy`` runs after the
        destruction)."""

    def load_carried(self, held: list, has_moments: bool, step: int) -> None:
        """Write ``[(param name, holder's DP rank, full state on the holder else None)]`` (module
        order) into this freshly built engine: masters, Adam moments at ``step`` (collective)."""

    def save(self, folder: str) -> list[str]:
        """Write model and optimizer state under ``folder`` (collective; each rank its own
        files); returns the paths of the files this rank wrote. A failed write raises on the rank that met it; that rank then calls
        ``after_failed_save`` so that the ranks that finished are not left waiting."""

    def after_failed_save(self) -> None: ...

    def load(self, folder: str) -> bool:
        """Restore what ``save`` wrote into an engine of the same shapes and layout; False when
        ``folder`` holds no state of this engine (collective)."""

    def destroy(self) -> None: ...


def named_parameters(engine: TrainEngine) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return engine.module.named_parameters()
