"""Sheared-LLaMA in the training loop: hard-concrete L0 gates learn the target shape.

Phases (``L0Runtime.phase``):

- ``before``: until ``prune.start_step``, plain training.
- ``soft``: steps start_step .. end_step - 1. Gates z (``pruning.l0``) multiply activations of the
  live megatron model through forward hooks: per layer one gate per query-head *slot* (position
  within a KV group, expanded over the groups so GQA stays well-formed) on the input of
  ``linear_proj``, one per FFN channel on the input of ``linear_fc2``, and (prune.prune_hidden)
  one per hidden channel on the residual stream where it is written (embedding output, outputs
  of linear_proj / linear_fc2), with RMSNorm statistics over the open channels as after their
  removal. Each training forward draws z with noise u from a generator seeded by (seed, step,
  micro-batch), so every data-parallel rank draws the same u and a resumed run the same draws;
  eval forwards use the deterministic test-time gates. The log_alphas are fp32 leaves outside
  the DeepSpeed engine; they get gradients from ``engine.backward`` of the LM (or distillation) loss,
  averaged over the data-parallel group, plus the gradient of the Lagrangian
  lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 on the expected sparsity (computed directly: it
  depends only on log_alpha and the lambdas, identical everywhere). One AdamW steps after every
  optimizer step: the log_alphas descend (prune.l0_lr), the lambdas ascend (prune.lagrangian_lr).
  The target t follows the run's schedule (``target_at``). Nothing is removed yet.
- ``final``: at end_step the gates become deterministic; a fixed shape (the same widths in every
  layer, as Sheared-LLaMA's targets) meeting the target is chosen from the expected counts
  (``l0.uniform_widths``), the best gates by log_alpha survive, and the compaction that follows
  at once folds the kept gate values into the weights and slices the rest away, weights and Adam
  moments alike (``slice_engine_state``).
- ``done``: the gates are gone; continued pretraining to train.steps.

Tensor parallelism: the gates are replicated on every rank; the head and FFN gates act on this
rank's slice of the linear_proj / linear_fc2 input, so their gradients come from the rank that
holds them (summed over TP, the hidden gates' from TP rank 0: they are computed on replicated
activations), and the compaction folds and re-shards tensor by tensor.

Pipeline parallelism: every stage gates its own layers (global layer numbers) and the hidden
channels where its modules write or normalise the residual stream; the gates' gradients are
summed over the stages, so every rank holds the same gates. The layer count stays fixed.

Not supported: layer gates (prune.allow_depth), OBS (the folded gates compensate instead). With
TransformerEngine layers the norms fused into linear_qkv / linear_fc1 keep their statistics over
every channel during the soft phase.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm.engine.base import TrainEngine
from megatron_effllm.errors import UserError
from megatron_effllm.log import get_logger
from megatron_effllm.parallel import comm
from megatron_effllm.pruning import l0
from megatron_effllm.pruning.groups import PrunePlan
from megatron_effllm.pruning.saliency import GroupScores
from megatron_effllm.pruning.selection import plan_from_widths
from megatron_effllm.pruning.surgery import masks_from_plan, norm_eps, rescale_to_kept
from megatron_effllm.safe_pickle import plain_copy
from megatron_effllm.training.runtime.base import RuntimeBase
from megatron_effllm.training.runtime.live_model import NORM_MODULES

log = get_logger(__name__)


def _segments(arch: Architecture, hidden: bool) -> dict[str, tuple[int, int]]:
    """{"head.l" | "ffn.l" | "hidden": (offset, size)} in the one flat log_alpha vector."""
    out, off = {}, 0
    for l, s in enumerate(arch.layers):
        for key, n in ((f"head.{l}", s.heads_per_group), (f"ffn.{l}", s.ffn_hidden_size)):
            out[key] = (off, n)
            off += n
    if hidden:
        out["hidden"] = (off, arch.hidden_size)
    return out


class L0Runtime(RuntimeBase):
    """The pruning runtime of prune.strategy=sheared (the ``PruningRuntime`` protocol)."""

    RUNTIMES = ("l0",)

    def __init__(self, cfg, arch: Architecture, source_params: int):
        super().__init__(cfg, arch, source_params)
        p = self.p
        if p.allow_depth:
            raise UserError("prune.strategy=sheared learns head, FFN and hidden-channel gates but no layer "
                            "gates; set prune.allow_depth=false (or use prune.strategy=efficientllm)")
        self._hooks: list = []
        self.phase = "before"
        self._hidden = bool(p.prune_hidden)
        self._seg = _segments(arch, self._hidden)
        n = sum(size for _, size in self._seg.values())
        # One flat fp32 leaf: one all-reduce, one optimizer tensor, one checkpoint entry.
        self.log_alpha: Optional[torch.Tensor] = torch.full((n,), l0.init_log_alpha(p.l0_droprate_init), dtype=torch.float32,
                                                            requires_grad=True)
        self.lambdas: Optional[torch.Tensor] = torch.zeros(2, dtype=torch.float32, requires_grad=True)
        self._opt: Optional[torch.optim.Optimizer] = None
        self._opt_state: Optional[dict] = None  # loaded before the device is known
        self._fold: Optional[dict] = None
        self._z: Optional[dict] = None
        self._step: Optional[int] = None
        self._micro = 0
        self._skip = False
        self._last: Optional[tuple[int, dict]] = None
        try:  # the floors of a shape that keeps every KV group and layer, checked before any work
            zeros = torch.zeros(n, dtype=torch.float64)
            l0.uniform_widths(arch, self.target, self.schedule.constraints(), **self._site_lists(zeros))
        except UserError as err:
            raise UserError(f"prune.target_params {p.target_params:g} ({self.target:,} parameters) is out of "
                            f"reach for prune.strategy=sheared: {err}") from None

    # ------------------------------------------------------------------ gates
    def _site_lists(self, flat: torch.Tensor) -> dict:
        """Per-gate values of the flat vector as expected_params / fold_gates take them
        (head slots expanded over the KV groups)."""
        seg = lambda k: flat[self._seg[k][0]:self._seg[k][0] + self._seg[k][1]]  # noqa: E731
        layers = range(self.arch.num_layers)
        return {
            "heads": [l0.expand_head_slots(seg(f"head.{l}"), self.arch.layers[l].num_kv_groups) for l in layers],
            "ffn": [seg(f"ffn.{l}") for l in layers],
            "hidden": seg("hidden") if self._hidden else None,
        }

    def _probs(self, cpu: bool = False) -> dict:
        """P(z != 0) per site; ``cpu``: detached, moved in one copy (for per-site sums on the host)."""
        flat = self.log_alpha.detach().cpu() if cpu else self.log_alpha
        return self._site_lists(l0.prob_nonzero(flat.double()))

    def _expected_params(self) -> torch.Tensor:
        return l0.expected_params(self.arch, **self._probs())

    def _deterministic(self) -> torch.Tensor:
        la = self.log_alpha.detach()
        return torch.cat([l0.deterministic_gates(la[o:o + n]) for o, n in self._seg.values()])

    def _draw_gates(self, module, args):
        """Model pre-hook: this forward's gates (a sample when training, test-time in eval)."""
        if self.phase != "soft":
            self._z = None
            return
        la = self.log_alpha
        if module.training:
            if self._step is None:
                raise RuntimeError("L0Runtime.start_step(step=...) must come before a training forward")
            gen = l0.noise_generator(self.cfg.seed, self._step, self._micro)
            self._micro += 1
            u = torch.rand(la.shape, generator=gen, dtype=torch.float32).to(la.device)
            z = l0.sample_gates(la, u=u)
        else:
            z = self._deterministic()
        sites = self._site_lists(z)
        d = self.arch.head_dim
        gates = {}
        for l in range(self.arch.num_layers):
            gates[f"head.{l}"] = sites["heads"][l].repeat_interleave(d)
            gates[f"ffn.{l}"] = sites["ffn"][l]
        if self._hidden:
            h = sites["hidden"]
            gates["hidden"] = h
            gates["hidden_open"] = (h != 0).sum().to(torch.float32).clamp(min=1.0)
        self._z = gates

    def _scale_input(self, key: str):
        def hook(module, args):
            if self._z is None:
                return None
            x = args[0]
            z = self._z[key]
            if self.dims.tp > 1:  # this rank's heads / FFN channels: a contiguous range of the input
                n = z.numel() // self.dims.tp
                z = z[self.dims.tp_rank * n:(self.dims.tp_rank + 1) * n]
            return (x * z.to(x.dtype),) + tuple(args[1:])

        return hook

    def _gate_output(self, module, args, output):
        """The residual stream's writers: megatron linears return (output, bias)."""
        if self._z is None:
            return output
        z = self._z["hidden"]
        if isinstance(output, tuple):
            out, bias = output[0], output[1]
            return (out * z.to(out.dtype), None if bias is None else bias * z.to(bias.dtype)) + tuple(output[2:])
        return output * z.to(output.dtype)

    def _gate_norm(self, module, args, output):
        """RMSNorm statistics over the open hidden channels only (the closed ones are exactly zero
        in the stream), as they will be after the closed channels are removed."""
        if self._z is None:
            return output
        return rescale_to_kept(args[0], output, norm_eps(module, self.arch.rms_norm_eps), self._z["hidden_open"])

    # ------------------------------------------------------------------ hooks on the live model
    def install(self, engine: TrainEngine) -> None:
        """Hooks on the engine's module drawing the gates and applying them (nothing once the
        gates are gone)."""
        model = engine.module
        self._attach(model)
        if self.log_alpha is None:
            return
        self._to_device(next(model.parameters()).device)
        self._hooks.append(model.register_forward_pre_hook(self._draw_gates))
        for name, module in model.named_modules():
            parts = name.split(".")
            if name.endswith("self_attention.linear_proj") or name.endswith("mlp.linear_fc2"):
                l = self.global_layer(int(parts[parts.index("layers") + 1]))
                key = f"head.{l}" if name.endswith("linear_proj") else f"ffn.{l}"
                self._hooks.append(module.register_forward_pre_hook(self._scale_input(key)))
                if self._hidden:
                    self._hooks.append(module.register_forward_hook(self._gate_output))
            elif self._hidden and name == "embedding":
                self._hooks.append(module.register_forward_hook(self._gate_output))
            # (With TransformerEngine these names are IdentityOps: the norms are fused into the linears.)
            if (self._hidden and name.endswith(NORM_MODULES)
                    and getattr(module, "weight", None) is not None):
                self._hooks.append(module.register_forward_hook(self._gate_norm))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _to_device(self, device) -> None:
        """Gates on the model's device, and their optimizer (built here, once it is known)."""
        if self.log_alpha.device != device:
            self.log_alpha = self.log_alpha.detach().to(device).requires_grad_(True)
            self.lambdas = self.lambdas.detach().to(device).requires_grad_(True)
            if self._opt is not None:
                self._opt_state, self._opt = self._opt.state_dict(), None
        if self._opt is None:
            self._opt = torch.optim.AdamW([
                {"params": [self.log_alpha], "lr": self.p.l0_lr, "weight_decay": 0.0},
                {"params": [self.lambdas], "lr": self.p.lagrangian_lr, "weight_decay": 0.0, "maximize": True},
            ])
            if self._opt_state is not None:
                self._opt.load_state_dict(self._opt_state)
                self._opt_state = None

    # ------------------------------------------------------------------ the loop's calls
    def start_step(self, collecting: bool, samples_per_rank: float, grad_scale: float,
                   step: Optional[int] = None) -> None:
        self._step = step
        self._micro = 0
        self._skip = False
        if collecting and self.phase == "before":
            self.phase = "soft"
        if self.log_alpha is not None:
            self.log_alpha.grad = None

    def end_micro_batch(self, samples: float) -> None:
        """Nothing to count: the gates' gradient is the loss's, averaged by the engine."""

    def extra_grad_leaves(self) -> list:
        return [self.log_alpha] if self.phase == "soft" and self.log_alpha is not None else []

    @contextlib.contextmanager
    def paused(self):
        """Nothing records from gradients: the hand-over backward needs no pause."""
        yield

    def before_micro_batch_backward(self, batch: dict) -> None:
        """The gates need nothing from the pipeline schedule (their gradients are the leaves')."""

    def end_pipeline_schedule(self) -> None:
        """As ``before_micro_batch_backward``."""

    def end_step(self, skipped) -> None:
        """No running statistics: a skipped step's gate gradients go with ``discard_step``."""

    def discard_step(self) -> None:
        self._skip = True
        if self.log_alpha is not None:
            self.log_alpha.grad = None

    def event_due(self, step: int) -> bool:
        """After every optimizer step of the soft phase: the gates' own step (and at end_step the
        final shape)."""
        return self.enabled and self.phase == "soft" and self.p.start_step < step <= self.p.end_step

    def compaction_due(self, step: int) -> bool:
        return self.phase == "final"

    def target_sparsity(self, step: int) -> float:
        return 1.0 - self.target_at(step) / self.source_params

    def prune_event(self, engine, step: int) -> Optional[dict]:
        """The gates' update for step ``step``; at end_step the final shape (masked, folded and
        sliced by the compaction that follows)."""
        self.events += 1
        if self._skip:  # the gates need no statistics: they keep their values until a step counts
            log.info(f"[prune] step {step}: no L0 gate update (the step was skipped as non-finite)")
        else:
            self._update_gates(step)
        self._skip = False
        if step >= self.p.end_step:
            return self._finalize(step)
        if self.events == 1:  # the shape the gates start from, so that plots of the run do too
            return {"kind": "prune", "step": self.p.start_step, "target": self.source_params,
                    "params": self.arch.num_params(), "architecture": self.arch.to_dict()}
        if (step - self.p.start_step) % self.p.interval:
            return None
        # The shape the gates expect now, for the logs and the architecture plots.
        eff = self.effective_arch()
        return {"kind": "prune", "step": step, "target": self.target_at(step), "params": eff.num_params(),
                "architecture": eff.to_dict(), "expected": True, **self._metrics(step)}

    def _update_gates(self, step: int) -> None:
        la, lam = self.log_alpha, self.lambdas
        grad = la.grad.detach().clone() if la.grad is not None else torch.zeros_like(la)
        if self.dims.tp > 1:
            # Head / FFN gates: each TP rank has the gradient of its own slice (zero elsewhere);
            # hidden gates act on replicated activations, so take TP rank 0's. Summed over TP,
            # every rank holds the same gradient.
            if self._hidden and self.dims.tp_rank != 0:
                off, n = self._seg["hidden"]
                grad[off:off + n] = 0.0
            comm.all_reduce_(grad, "tp")
        # Each stage has the gradient of its own layers' gates and its part of the hidden
        # gates' (the embedding, its layers' residual writers and norms): they add up.
        comm.all_reduce_(grad, "pp")
        size = comm.size("dp")
        if size > 1:  # the gradient of the global batch's loss: identical gates on every rank
            comm.all_reduce_(grad, "dp")
            grad /= size
        if not bool(torch.isfinite(grad).all()):  # identical on every rank after the all-reduce
            la.grad = None
            return
        s_hat = 1.0 - self._expected_params() / self.source_params
        lag = l0.lagrangian(s_hat, self.target_sparsity(step), lam[0].double(), lam[1].double())
        g_la, g_lam = torch.autograd.grad(lag, [la, lam])
        la.grad = grad + g_la
        lam.grad = g_lam
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _metrics(self, step: int) -> dict:
        expected = float(self._expected_params())
        return {"expected_params": expected, "expected_sparsity": 1.0 - expected / self.source_params,
                "target_sparsity": self.target_sparsity(step),
                "lambda1": float(self.lambdas[0]), "lambda2": float(self.lambdas[1])}

    def step_metrics(self, step: int) -> dict:
        if self.phase == "soft":
            return self._metrics(step)
        if self._last is not None and self._last[0] == step:
            return dict(self._last[1])
        return {}

    def current_params(self) -> int:
        if self.phase == "soft":
            with torch.no_grad():
                return int(round(float(self._expected_params())))
        return self.effective_arch().num_params()

    def effective_arch(self) -> Architecture:
        if self.phase == "soft":
            with torch.no_grad():
                return l0.expected_architecture(self.arch, **self._probs(cpu=True))
        return self.effective_plan().after

    # ------------------------------------------------------------------ the end of the soft phase
    def _check_ranks_agree(self) -> None:
        """Every rank (data and model parallel) holds the same gates, or the final shapes differ."""
        x = torch.cat([self.log_alpha.detach(), self.lambdas.detach()]).cpu()
        comm.check_agreement(x.numpy().tobytes(), "the L0 gates", "world",
                             advice="the final shape would differ between them")

    @torch.no_grad()
    def _finalize(self, step: int) -> dict:
        """Deterministic gates -> a uniform shape at the target -> masks, and the values to fold."""
        self._check_ranks_agree()
        metrics = self._metrics(step)
        widths, hidden = l0.uniform_widths(self.arch, self.target, self.schedule.constraints(),
                                           **self._probs(cpu=True))
        la = self.log_alpha.detach().double().cpu()
        # Within a layer the largest log_alphas survive (slot scores are equal across KV groups, so
        # every group keeps the same slots).
        scores = GroupScores(self.arch, **self._site_lists(la))
        plan = plan_from_widths(scores, widths, hidden)
        # Head / FFN gate values fold into the o_proj / down_proj input columns. Hidden gates fold
        # too, into the rows of the residual writers and the embedding columns (with the tied
        # lm_head compensated in the final norm): dropping them would rescale every channel of the
        # residual stream at once, a jump in the function the soft phase trained.
        self._fold = self._site_lists(l0.gate_values(la))
        self.masks = masks_from_plan(plan)
        self.phase = "final"
        self._z = None
        self._last = (step, metrics)
        self.history.append({"step": step, "target": self.target, "params": plan.after.num_params()})
        return {"kind": "prune", "step": step, "target": self.target, "params": plan.after.num_params(),
                "architecture": plan.after.to_dict(), **metrics}

    def slice_engine_state(self, plan: PrunePlan):
        """The common slicing, after folding the gate values into the fp32 masters.

        Adam moments carry over unscaled: Adam's step m / sqrt(v) does not depend on the
        gradient's scale, and a kept gate of value zero would make rescaled moments infinite."""
        fold, arch = self._fold, self.arch
        if fold is None:
            return self._slicer(plan)
        return self._slicer(plan, fold=lambda canon: l0.fold_gates(canon, arch, **fold))

    def after_compaction(self, plan: PrunePlan) -> None:
        self._reset_shape(plan)
        self.remove_hooks()
        self.phase = "done"
        self.log_alpha = self.lambdas = None
        self._opt = self._opt_state = self._fold = self._z = None
        self._seg = {}

    # ------------------------------------------------------------------ checkpoint
    def rank_state_dict(self) -> None:
        """Nothing differs between ranks (the gates are replicated)."""
        return None

    def dp_shared_state_dict(self) -> None:
        return None

    def load_rank_state_dict(self, state: Optional[dict], dp_shared: Optional[dict] = None) -> None:
        """Nothing to load (``rank_state_dict``)."""

    def load_other_layout(self, old: list) -> None:
        """Nothing to move: the gates are replicated and saved in ``state_dict``."""

    def state_dict(self) -> dict:
        opt = self._opt.state_dict() if self._opt is not None else self._opt_state
        return {
            "strategy": "sheared",
            **self._common_state(),
            "phase": self.phase,
            "log_alpha": None if self.log_alpha is None else plain_copy(self.log_alpha),
            "lambdas": None if self.lambdas is None else plain_copy(self.lambdas),
            "optimizer": plain_copy(opt),
            "fold": plain_copy(self._fold),
        }

    def load_state_dict(self, state: dict) -> None:
        """Every data-parallel rank loads the same state (the gates are replicated)."""
        if state.get("strategy") != "sheared":
            raise UserError("the checkpoint's pruning state was not written with prune.strategy=sheared; "
                            "resume with the strategy it was written with, or start over (resume: none)")
        self._load_common_state(state)
        self.phase = state["phase"]
        if state["log_alpha"] is None:
            self.log_alpha = self.lambdas = None
            self._seg = {}
        else:
            self._seg = _segments(self.arch, self._hidden)
            if state["log_alpha"].numel() != sum(n for _, n in self._seg.values()):
                raise UserError("the checkpoint's L0 gates do not fit this run (prune.prune_hidden changed?); "
                                "resume with the configuration the checkpoint was written with")
            self.log_alpha = state["log_alpha"].detach().clone().float().requires_grad_(True)
            self.lambdas = state["lambdas"].detach().clone().float().requires_grad_(True)
        self._opt, self._opt_state = None, state["optimizer"]
        self._fold = state.get("fold")
