"""Pruning inside a training run: the adapter between the pruning core (canonical tensors) and
the live megatron-core model inside a DeepSpeed engine.

Per step (after backward, before the optimizer step) the saliency accumulator reads the
step's own weights and gradients, mapped to canonical names; layer Hessians for the OBS update
are summed from forward hooks. At a prune event the selector picks, from the scores of the
still-unmasked groups, what to remove next to meet the schedule's target; those groups are
masked at once (their weights are zeroed before every forward, so their gradients carry no
signal and the forward is exactly the pruned model's, RMSNorm statistics included), and OBS
compensates the surviving columns of o_proj / down_proj. Every ``compact_every`` events the
masked groups are removed physically: weights, fp32 masters and Adam moments are sliced with
the same indices and the engine is rebuilt.

Model parallelism (any TP and PP): the gradient hooks feed this rank's shard at its offsets in
the canonical tensors (``parallel.distributed_pruning``), a prune event sums the scores over TP
(and PP) and DP, selects on every rank from the same numbers and checks that every rank chose the same
plan before any weight changes; masks are applied shard by shard; OBS keeps the Hessian of the
o_proj / down_proj columns this rank holds (block-diagonal over TP, exact at TP=1); a compaction
re-shards each tensor (weights and Adam moments) through its canonical form, one at a time.
Under PP every stage hooks, masks, OBS-updates and slices its own layers (global layer numbers
in the canonical names), the scores are summed over TP, PP and DP, and the layer count stays
fixed (prune.allow_depth=false), so no layer moves between stages.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from megatron_effllm.architecture import Architecture
from megatron_effllm import layout
from megatron_effllm.errors import UserError
from megatron_effllm.parallel import distributed_pruning as dist_pruning
from megatron_effllm.pruning import obs as obs_mod
from megatron_effllm.pruning.groups import PrunePlan
from megatron_effllm.pruning.saliency import GradSaliency
from megatron_effllm.pruning.selection import Constraints
from megatron_effllm.pruning.selectors.adaptive import select_adaptive
from megatron_effllm.pruning.selectors.global_ranking import select_global
from megatron_effllm.pruning.selectors.uniform import select_uniform
from megatron_effllm.pruning.surgery import (
    full_masks,
    masks_from_plan,
    plan_from_masks,
    slice_group_vectors,
)
from megatron_effllm.engine import _zero_params as eng
from megatron_effllm.training.schedules import target_params

TRAINING_STRATEGIES = ("efficientllm", "uniform", "adapt", "sheared", "none")


def make_runtime(cfg, arch: Architecture, source_params: int) -> "PruningRuntime":
    """The pruning runtime of ``cfg.prune.strategy``: learned L0 gates (sheared) or saliency."""
    if cfg.prune.strategy == "sheared":
        from megatron_effllm.training.l0_runtime import L0Runtime

        return L0Runtime(cfg, arch, source_params)
    return PruningRuntime(cfg, arch, source_params)


def compose_plans(first: PrunePlan, second: PrunePlan) -> PrunePlan:
    """The plan doing ``first`` then ``second`` (made on ``first.after``), on ``first.before``."""
    layers = [first.kept_layers[l] for l in second.kept_layers]
    pos = {old: new for new, old in enumerate(first.kept_layers)}
    heads, kv, ffn = {}, {}, {}
    for l0 in layers:
        l1 = pos[l0]
        heads[l0] = first.heads[l0][second.heads[l1]]
        kv[l0] = first.kv[l0][second.kv[l1]]
        ffn[l0] = first.ffn[l0][second.ffn[l1]]
    return PrunePlan.build(first.before, layers, heads, kv, ffn, first.hidden[second.hidden])


def _param_pieces(arch: Architecture, name: str, w: torch.Tensor, g: torch.Tensor,
                 tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> dict:
    """{canonical name: (weight piece, gradient piece, {dim: start})} of one megatron parameter
    of shard (tp_rank, pp_rank). Tensors replicated over TP (norms) come from TP rank 0 only,
    so that the TP ranks' sums add up to the whole model's.

    Under PP a tied embedding has two copies, each seeing the gradient of one use (input on the
    first stage, output on the last): the training runtime feeds the last stage's copy and adds
    the first stage's part after the schedule (``PruningRuntime.end_pipeline_schedule``)."""
    w_pieces = layout.canonical_pieces(arch, name, w, layout.ParallelDims(tp_rank, tp_size, pp_rank, pp_size), check=False)
    g_pieces = layout.canonical_pieces(arch, name, g, layout.ParallelDims(tp_rank, tp_size, pp_rank, pp_size), check=False)
    out = {}
    for canon, (wc, off) in w_pieces.items():
        if not off and tp_rank != 0:
            continue
        out[canon] = (wc, g_pieces[canon][0], off)
    return out


# A tied embedding's two megatron copies under PP: the first stage's, the last stage's.
_TIED_COPIES = ("embedding.word_embeddings.weight", "output_layer.weight")


def _elementwise(quantity: str, wg: torch.Tensor) -> torch.Tensor:
    """The element-wise term of a saliency quantity from w * g."""
    return wg if quantity == "wg" else wg.abs() if quantity == "awg" else wg.square()


class PruningRuntime:
    """Scores, masks, OBS statistics and the schedule of one training run (any TP, PP)."""

    STRATEGIES = ("efficientllm", "uniform", "adapt", "none")  # what this class runs (make_runtime)
    USES_SALIENCY = True

    def __init__(self, cfg, arch: Architecture, source_params: int):
        p = cfg.prune
        if p.strategy not in TRAINING_STRATEGIES:
            raise UserError(
                f"prune.strategy {p.strategy!r} is not available in the training loop yet; use one "
                f"of {', '.join(TRAINING_STRATEGIES)} (or tools/prune_oneshot.py for the other selectors)"
            )
        if p.strategy not in self.STRATEGIES:
            raise ValueError(f"{type(self).__name__} does not run prune.strategy {p.strategy!r}; "
                             "build the runtime with make_runtime()")
        if self.USES_SALIENCY and p.estimator not in ("taylor", "taylor_elem", "fisher", "mix"):
            raise UserError(
                f"prune.estimator {p.estimator!r} needs activations; during training use taylor, "
                "taylor_elem, fisher or mix"
            )
        self.cfg = cfg
        self.p = p
        self.enabled = p.strategy != "none"
        self.arch = arch  # physical shape of the model in the engine
        self.masks = full_masks(arch)
        self.source_params = source_params
        embed = 0 if p.count_embeddings else arch.embedding_params()
        if p.target_params <= 1.0:
            self.target = int(round(p.target_params * (source_params - embed))) + embed
        else:
            self.target = int(p.target_params)
        if self.enabled and self.target >= source_params:
            raise UserError(
                f"prune.target_params {p.target_params:g} is not below the source size "
                f"({source_params:,} parameters); choose a smaller target"
            )
        self.saliency = GradSaliency(arch, estimators=(p.estimator,) if self.USES_SALIENCY else ())
        self.hessians = obs_mod.HessianAccumulator()
        self.events = 0
        self._hooks = []
        self._live: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._mask_hooks: list = []  # ZeRO-3: per-module mask hooks (replaced at every event)
        self._hidden_mask: Optional[torch.Tensor] = None
        self.history: list[dict] = []
        self._obs_cache = {}
        self.layer_cos = torch.zeros(arch.num_layers, 2, dtype=torch.float64)  # [sum cos, count]
        self._tp_rank, self._tp = 0, 1  # this rank's tensor-parallel layout (set in install)
        self._pp_rank, self._pp = 0, 1  # and pipeline stage

    # ------------------------------------------------------------------ schedule
    def effective_plan(self) -> PrunePlan:
        return plan_from_masks(self.arch, self.masks)

    def effective_arch(self) -> Architecture:
        return self.effective_plan().after

    def target_at(self, step: int) -> int:
        return target_params(step, source=self.source_params, target=self.target,
                             start=self.p.start_step, end=self.p.end_step, curve=self.p.curve)

    def event_due(self, step: int) -> bool:
        """A prune event after optimizer step ``step`` (1-based count of completed steps)."""
        if not self.enabled or step <= self.p.start_step:
            return False
        return (step - self.p.start_step) % self.p.interval == 0 or step == self.p.end_step

    def compaction_due(self, step: int) -> bool:
        if not self.enabled:
            return False
        pending = not self.effective_plan().is_identity
        return pending and (self.events % self.p.compact_every == 0 or step >= self.p.end_step)

    def constraints(self) -> Constraints:
        return Constraints(
            tensor_parallel=self.cfg.parallel.tp,
            min_heads=max(1, self.p.min_heads_per_group),
            min_ffn=max(1, self.p.min_ffn),
            prune_hidden=self.p.prune_hidden,
            allow_depth=self.p.allow_depth,
        )

    # ------------------------------------------------------------------ hooks on the live model
    def install(self, model: torch.nn.Module) -> None:
        """Forward hooks: zero masked weights, correct RMSNorm statistics, record OBS inputs."""
        self.remove_hooks()
        self._tp_rank, self._tp, self._pp_rank, self._pp = dist_pruning.model_parallel_sizes()
        self._hooks.append(model.register_forward_pre_hook(self._apply_masks))
        for name, module in model.named_modules():
            if name.endswith(("input_layernorm", "pre_mlp_layernorm", "final_layernorm")):
                self._hooks.append(module.register_forward_hook(self._norm_hook))
            if self.p.strategy == "adapt" and name.startswith("decoder.layers.") and name.count(".") == 2:
                self._hooks.append(module.register_forward_hook(
                    self._block_hook(self.global_layer(int(name.split(".")[2]))), with_kwargs=True))
            if self.p.obs and (name.endswith("self_attention.linear_proj") or name.endswith("mlp.linear_fc2")):
                canon = self._canonical_site(name, self.global_layer)
                self._hooks.append(module.register_forward_pre_hook(self._hessian_hook(canon)))
        samples_per_micro = float(self.cfg.data.micro_batch)
        self._tied_pp = self._pp > 1 and self.arch.tie_word_embeddings
        self._tied_rows, self._tied_in, self._tied_out = [], [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._hooks.append(p.register_hook(self._grad_hook(name, p, samples_per_micro)))
        self._model = model
        self._refresh_live_masks()

    def remove_hooks(self) -> None:
        for h in self._hooks + self._mask_hooks:
            h.remove()
        self._hooks, self._mask_hooks = [], []

    def global_layer(self, local: int) -> int:
        """The model's layer number of this pipeline stage's layer ``local``."""
        return self.local_layers()[local]

    def local_layers(self) -> range:
        """The model's layer numbers this pipeline stage holds."""
        return layout.stage_layers(self.arch.num_layers, self._pp, self._pp_rank)

    @staticmethod
    def _canonical_site(module_name: str, to_global=lambda l: l) -> str:
        # "decoder.layers.3.self_attention.linear_proj" -> "model.layers.3.self_attn.o_proj.weight"
        parts = module_name.split(".")
        i = parts.index("layers")
        layer = to_global(int(parts[i + 1]))
        leaf = "self_attn.o_proj.weight" if module_name.endswith("linear_proj") else "mlp.down_proj.weight"
        return f"model.layers.{layer}.{leaf}"

    def _hessian_hook(self, canon_name: str):
        def hook(module, args):
            if module.training and self._collect_hessians:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                # A strided subset of the tokens: X^T X over every token costs as much as a
                # large matmul per layer, and the EMA over steps supplies the rest.
                stride = max(1, x.shape[0] // self.p.obs_tokens_per_step)
                self.hessians.add(canon_name, x[::stride].float())
        return hook

    _collect_hessians = False

    def _block_hook(self, layer: int):
        """Adapt-Pruner's layer importance: sums of cos(x_in, x_out) per token of a block."""

        def hook(module, args, kwargs, output):
            if not (module.training and self._collecting):
                return
            x_in = (args[0] if args else kwargs["hidden_states"]).detach().float()
            x_out = (output[0] if isinstance(output, tuple) else output).detach().float()
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
            self.layer_cos[layer, 0] += cos.sum().double()
            self.layer_cos[layer, 1] += cos.numel()

        return hook

    def collect_hessians(self, on: bool) -> None:
        """Record o_proj / down_proj inputs in the coming forwards (EMA-weighted like scores)."""
        on = bool(on and self.p.obs)
        if on:
            for v in self.hessians.state.values():
                v.mul_(self.p.ema)
        self._collect_hessians = on

    def _apply_masks(self, module, args):
        """Before the model's forward (ZeRO-3: ``_zero3_mask_hook`` instead)."""
        with torch.no_grad():
            for p, m in self._live:
                p.data.mul_(m)

    @staticmethod
    def _zero3_mask_hook(masked: list):
        """Pre-forward hook of a module owning ZeRO-3 parameters, after DeepSpeed's gather: the
        gathered weights and this rank's partition (which a later gather reads, e.g. for the
        backward) are masked; ZeRO-3 may keep parameters gathered across uses, so masking the
        partitions alone is not enough."""

        def hook(module, args):
            with torch.no_grad():
                for p, full, local in masked:
                    if p.data.numel() == full.numel():
                        p.data.mul_(full.view_as(p.data))
                    p.ds_tensor.data.mul_(local)

        return hook

    def _norm_hook(self, module, args, output):
        """Make RMSNorm's statistics run over the kept hidden channels only (as after removal)."""
        m = self._hidden_mask
        if m is None:
            return output
        x = args[0]
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-6)
        # Masked channels of the residual stream are exactly zero, so one sum serves both means.
        ss = x.float().pow(2).sum(-1, keepdim=True)
        scale = torch.sqrt((ss / x.shape[-1] + eps) / (ss / self._hidden_kept + eps))
        return (output.float() * scale).to(output.dtype)

    def _refresh_live_masks(self) -> None:
        """Megatron-layout 0/1 tensors for the parameters the current masks touch."""
        self._live = []
        for h in self._mask_hooks:
            h.remove()
        self._mask_hooks = []
        self._hidden_mask = None
        plan = self.effective_plan()
        if plan.is_identity:
            return
        from megatron_effllm.model.weights import model_style

        # This rank's shard of the masks (at TP=1 and PP=1 the whole model).
        params = dict(self._model.named_parameters())
        meg = dist_pruning.local_weight_masks(self.arch, self.masks, tp_rank=self._tp_rank, tp_size=self._tp,
                                              pp_rank=self._pp_rank, pp_size=self._pp,
                                              style=model_style(self._model),
                                              device=next(iter(params.values())).device)
        zero3: dict[str, list] = {}  # owning module name -> [(param, full mask, local mask)]
        # The masks stay bool (a byte per masked weight, not the weight's dtype): multiplying by
        # them gives the same bits as by 0.0 / 1.0.
        for name, m in meg.items():
            if name in params:
                p = params[name]
                if eng.is_zero3_param(p):
                    full = m.to(device=p.ds_tensor.device)
                    zero3.setdefault(name.rsplit(".", 1)[0], []).append(
                        (p, full, eng.zero3_local_part(full, p, fill=1.0)))
                else:
                    self._live.append((p, m.to(device=p.device)))
        modules = dict(self._model.named_modules())
        for owner, masked in zero3.items():
            self._mask_hooks.append(modules[owner].register_forward_pre_hook(self._zero3_mask_hook(masked)))
        if plan.after.hidden_size != self.arch.hidden_size:
            self._hidden_mask = self.masks["hidden"].float()
            self._hidden_kept = float(plan.after.hidden_size)

    # ------------------------------------------------------------------ saliency
    def start_step(self, collecting: bool, samples_per_rank: float, grad_scale: float,
                   step: Optional[int] = None) -> None:
        """Before step ``step``'s micro-batches: decay the running sums once (EMA), arm the hooks.

        ``grad_scale`` undoes the engine's loss scaling for gradient accumulation, so that each
        hooked gradient times ``samples_per_micro`` is a sum over samples; summed over micro-batches
        and data-parallel ranks the state is that of one process over the global batch.
        """
        self._collecting = bool(collecting and self.enabled)
        self._grad_scale = grad_scale
        self.collect_hessians(self._collecting)
        if self._collecting:
            self.saliency.decay_(self.p.ema)
            self.layer_cos.mul_(self.p.ema)
            self._samples = samples_per_rank

    def end_micro_batch(self, samples: float) -> None:
        if self._collecting and self._tp_rank == 0 and self._pp_rank == 0:  # one count per model replica
            self.saliency.add_count(samples)

    def extra_grad_leaves(self) -> list:
        """Leaves outside the model whose ``.grad`` the step's backward fills (L0 gates)."""
        return []

    @contextlib.contextmanager
    def paused(self):
        """No recording by the gradient hooks inside (the pipeline's hand-over backward, which
        carries gradients the hooks have already seen)."""
        was, self._collecting = self._collecting, False
        try:
            yield
        finally:
            self._collecting = was

    def discard_step(self) -> None:
        """The step's update was skipped (non-finite): forget what it would have applied.

        The saliency sums are put back by faults.StepGuard; learned gates (L0Runtime) override."""

    def snapshot_statistics(self) -> dict:
        """Copies of the statistics a step adds to (saliency, Hessians, layer cosines)."""
        return {"saliency": {k: v.clone() for k, v in self.saliency.state.items()},
                "hessians": {k: v.clone() for k, v in self.hessians.state.items()},
                "layer_cos": self.layer_cos.clone()}

    def restore_statistics(self, snap: dict) -> None:
        """Put back a ``snapshot_statistics()`` (a step whose update was skipped)."""
        self.saliency.state, self.hessians.state, self.layer_cos = snap["saliency"], snap["hessians"], snap["layer_cos"]

    def current_params(self) -> int:
        """The model size the progress line shows: that of the masked model."""
        return self.effective_arch().num_params()

    def step_metrics(self, step: int) -> dict:
        """Extra fields for the step's ``train`` record (L0Runtime: expected size, lambdas)."""
        return {}

    _collecting = False

    def _grad_hook(self, name: str, param: torch.nn.Parameter, samples_per_micro: float):
        """Tensor hook: this micro-batch's gradient of one parameter, folded into the scores."""

        def hook(grad):
            if self._collecting:
                with torch.no_grad():
                    w = param.detach().float()
                    g = grad.detach().float() * (self._grad_scale * samples_per_micro)
                    if self._tied_pp and name in _TIED_COPIES:
                        first = name == _TIED_COPIES[0]
                        kept = self._tied_in if first else self._tied_out
                        kept.append(g[self._tied_rows[len(kept)]])
                        if first:  # added to the last stage's copy after the schedule
                            return grad
                    pieces = _param_pieces(self.arch, name, w, g, self._tp_rank, self._tp,
                                           self._pp_rank, self._pp)
                    for canon, (wc, gc, off) in pieces.items():
                        wg = wc * gc
                        for q in self.saliency.quantities:
                            self.saliency.add_elementwise(q, canon, _elementwise(q, wg), off)
            return grad

        return hook

    # ------------------------------------------------------------------ tied embedding under PP
    _tied_pp = False

    def before_micro_batch_backward(self, batch: dict) -> None:
        """Pipeline schedule: ``batch``'s backward comes next on this stage. Its input tokens are
        the embedding rows whose gradient has two parts under PP with tied embeddings: the input
        use's (first stage) and the output use's (last stage)."""
        if not (self._tied_pp and self._collecting):
            return
        n = self.arch.vocab_size // self._tp
        rows = torch.unique(batch["tokens"]) - self._tp_rank * n  # this TP rank's vocabulary shard
        self._tied_rows.append(rows[(rows >= 0) & (rows < n)])

    @torch.no_grad()
    def end_pipeline_schedule(self) -> None:
        """After the step's micro-batches: the first stage's part of the tied embedding's
        gradient joins the last stage's. The scores see each micro-batch's full gradient
        g = g_in + g_out, as at PP=1: the last stage fed f(w * g_out) for every row, and adds
        f(w * g) - f(w * g_out) on the rows the micro-batch's tokens touch (g_in is zero
        elsewhere). The transfer is the touched rows only (tokens x hidden per micro-batch).
        Collective over the embedding group (first and last stage)."""
        if not self._tied_pp:
            return
        rows, g_in, g_out = self._tied_rows, self._tied_in, self._tied_out
        self._tied_rows, self._tied_in, self._tied_out = [], [], []
        if not (self._collecting and rows):
            return
        from megatron.core import parallel_state as ps

        if not ps.is_rank_in_embedding_group():
            return
        first = ps.is_pipeline_first_stage()
        sizes = [len(r) for r in rows]
        if first:
            buf = torch.cat(g_in)
        else:
            w = dict(self._model.named_parameters())[_TIED_COPIES[1]].detach().float()
            buf = torch.empty(sum(sizes), w.shape[1], dtype=torch.float32, device=w.device)
        torch.distributed.broadcast(buf, src=ps.get_pipeline_model_parallel_first_rank(),
                                    group=ps.get_embedding_group())
        if first:
            return
        # Only the touched rows: the embedding's scores are sums over its rows (its one pruned
        # axis is the hidden one, whole on every TP rank), so the other rows would add zeros.
        for r, gi, go in zip(rows, buf.split(sizes), g_out):
            wr = w[r]
            for q in self.saliency.quantities:
                delta = _elementwise(q, wr * (gi + go)) - _elementwise(q, wr * go)
                self.saliency.add_elementwise(q, "model.embed_tokens.weight", delta)

    def _layer_importance(self, eff_plan: PrunePlan) -> torch.Tensor:
        """I_l = -mean cos(x_in, x_out) over data-parallel ranks (and the pipeline stages, each of
        which holds its own layers' sums), for the layers still there."""
        cos = self.layer_cos.clone()
        if torch.distributed.is_initialized():
            from megatron.core import parallel_state as ps

            dist_pruning.all_reduce_(cos, group=ps.get_data_parallel_group())
            if self._pp > 1:
                dist_pruning.all_reduce_(cos, group=ps.get_pipeline_model_parallel_group())
        mean = cos[:, 0] / cos[:, 1].clamp(min=1.0)
        return -mean[torch.as_tensor(eff_plan.kept_layers)]

    def reduced_saliency(self) -> GradSaliency:
        """A copy of the scores summed over tensor- and data-parallel ranks (tiny vectors)."""
        return dist_pruning.reduce_saliency(self.saliency)

    # ------------------------------------------------------------------ prune event (masking)
    def prune_event(self, engine, step: int) -> Optional[dict]:
        """Mask the next groups to meet the schedule's target after ``step``; OBS-update."""
        self.events += 1
        target = self.target_at(step)
        eff_plan = self.effective_plan()
        eff = eff_plan.after
        if eff.num_params() <= target:
            return None
        scorer = self.reduced_saliency()
        if not eff_plan.is_identity:
            scorer.apply_plan(eff_plan)
        scores = scorer.scores(self.p.estimator)
        if self.p.strategy == "uniform":
            plan = select_uniform(scores, target_params=target, constraints=self.constraints())
        elif self.p.strategy == "adapt":
            plan, _ = select_adaptive(scores, self._layer_importance(eff_plan), target,
                                      A=self.p.adapt_step, constraints=self.constraints())
        else:
            plan = select_global(scores, target, self.constraints())
        if plan.is_identity:
            return None
        total = compose_plans(eff_plan, plan)
        # Every rank selected from the same reduced scores; make sure before touching a weight.
        dist_pruning.check_same_decision(total)
        if self.p.obs and self.hessians.names():
            self._obs_update(engine, eff_plan, total)
        self.masks = masks_from_plan(total)
        self._refresh_live_masks()
        record = {"kind": "prune", "step": step, "target": target,
                  "params": total.after.num_params(), "architecture": total.after.to_dict()}
        self.history.append({k: record[k] for k in ("step", "target", "params")})
        return record

    @torch.no_grad()
    def _obs_update(self, engine, before: PrunePlan, after: PrunePlan) -> None:
        """Compensate o_proj / down_proj columns for heads and FFN channels masked just now.

        Per layer, H^-1 over the still-alive columns is computed once per compaction cycle (one
        Cholesky) and then downdated as columns go (O(n^2 |P|) per event), as SparseGPT does; a
        fresh inverse every event would cost a Cholesky per layer per step.

        Under tensor parallelism o_proj / down_proj are row-parallel: each rank holds a contiguous
        range of their input columns, and its Hessian is that of its own columns (the hook sees
        only its part of the input). So the update is block-diagonal over TP: each rank
        compensates the columns removed from its range within its own columns, with no
        communication (a full-width Hessian would cost O((heads*d)^2 + ffn^2) per layer on every
        rank and an all-gather of activations every step). Exact at TP=1. Units (heads, FFN
        channels) are numbered locally, from the start of this rank's range.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(engine.module.named_parameters())
        d = self.arch.head_dim
        tp_rank, tp = self._tp_rank, self._tp
        for local, l in enumerate(self.local_layers()):
            shape = self.arch.layers[l]
            if l not in after.kept_layers or l not in before.kept_layers:
                continue
            for kind, meg, canon, unit, width in (
                ("head", f"decoder.layers.{local}.self_attention.linear_proj.weight",
                 f"model.layers.{l}.self_attn.o_proj.weight", d, shape.num_heads),
                ("ffn", f"decoder.layers.{local}.mlp.linear_fc2.weight",
                 f"model.layers.{l}.mlp.down_proj.weight", 1, shape.ffn_hidden_size),
            ):
                lo = tp_rank * (width // tp)
                hi = lo + width // tp
                was = [u - lo for u in before.kept(kind, l).tolist() if lo <= u < hi]
                now = {u - lo for u in after.kept(kind, l).tolist() if lo <= u < hi}
                gone = [u for u in was if u not in now]
                if not gone or f"xtx.{canon}" not in self.hessians.state:
                    continue
                alive, Hinv = self._obs_inverse(canon, was, unit)
                pos = {u: i for i, u in enumerate(alive)}
                rm = torch.tensor([pos[u] * unit + j for u in gone for j in range(unit)])
                cols = torch.tensor([u * unit + j for u in alive for j in range(unit)])
                p = params[meg]
                W = safe_get_full_fp32_param(p)
                W = (W if W is not None else p.detach()).float()
                W_alive = W[:, cols].double()
                M = torch.linalg.inv(Hinv[rm][:, rm])
                W_alive -= W_alive[:, rm] @ M @ Hinv[rm, :]
                W_alive[:, rm] = 0.0
                W[:, cols] = W_alive.to(W.dtype)
                if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                    eng.set_full_master(p, W)
                if eng.is_zero3_param(p):
                    eng.set_zero3_module_param(p, W)
                else:
                    p.data.copy_(W.to(p.dtype))
                keep = torch.tensor([i for i in range(len(alive) * unit) if i not in set(rm.tolist())])
                Hinv = Hinv[keep][:, keep] - Hinv[keep][:, rm] @ M @ Hinv[rm][:, keep]
                self._obs_cache[canon] = ([u for u in alive if u not in set(gone)], Hinv)

    _obs_cache: dict = {}

    def _obs_inverse(self, canon: str, alive_units: list, unit: int):
        """(alive units, H^-1 over their columns) for one weight, from the cache when valid."""
        cached = self._obs_cache.get(canon)
        if cached is not None and cached[0] == alive_units:
            return cached
        cols = torch.tensor([u * unit + j for u in alive_units for j in range(unit)])
        H = self._reduced_hessian(canon)[cols][:, cols]
        entry = (list(alive_units), obs_mod.inverse_hessian(H))
        self._obs_cache[canon] = entry
        return entry

    def _reduced_hessian(self, canon: str) -> torch.Tensor:
        """The damped layer Hessian from every data-parallel rank's inputs (identical on all)."""
        acc = obs_mod.HessianAccumulator()
        acc.state = {k: self.hessians.state[k].clone() for k in (f"xtx.{canon}", f"n.{canon}")}
        if torch.distributed.is_initialized():
            from megatron.core import parallel_state as ps

            for v in acc.state.values():
                dist_pruning.all_reduce_(v, group=ps.get_data_parallel_group())
        return acc.hessian(canon, self.p.obs_damp)

    # ------------------------------------------------------------------ compaction
    def compaction_plan(self) -> PrunePlan:
        return self.effective_plan()

    def slice_engine_state(self, plan: PrunePlan, fold=None):
        """The function the engine rebuild calls: this rank's megatron-named state -> sliced.

        Any TP size: each tensor is gathered over TP, sliced in canonical form and re-sharded for
        the new shape, one tensor at a time (``distributed_pruning.reshard_state``); ``fold``
        transforms the canonical fp32 masters first (L0Runtime)."""
        arch = self.arch

        def fn(full: dict) -> dict:
            return dist_pruning.reshard_state(arch, plan, full, fold=fold)

        return fn

    def after_compaction(self, plan: PrunePlan) -> None:
        self.saliency.apply_plan(plan)
        if self.hessians.names():
            if self._tp > 1:  # each rank's block of columns, re-cut along the new shards
                self.hessians.state = dist_pruning.reshard_block_hessians(self.hessians.state, plan)
            else:
                self.hessians.apply_plan(plan)
        self.arch = plan.after
        self.masks = full_masks(self.arch)
        self._obs_cache = {}  # column numbering changed; the next event refreshes H^-1
        self.layer_cos = self.layer_cos[torch.as_tensor(plan.kept_layers)].clone()
        self._live = []
        self._hidden_mask = None

    # ------------------------------------------------------------------ checkpoint
    @torch.no_grad()
    def consolidate(self) -> None:
        """Move every data-parallel rank's running sums to DP rank 0 (others hold zeros), and the
        saliency sums also to TP rank 0.

        The totals, which are all any decision reads, do not change; afterwards rank 0's state
        alone is the whole shared state, so a checkpoint needs only one copy of it. Under TP the
        Hessians stay per TP rank (each its own columns: ``rank_state_dict``).
        """
        if not torch.distributed.is_initialized():
            return
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group()
        if torch.distributed.get_world_size(group) > 1:
            first = ps.get_data_parallel_rank() == 0
            for state in (self.saliency.state, self.hessians.state, {"layer_cos": self.layer_cos}):
                for key in sorted(state):
                    dist_pruning.all_reduce_(state[key], group=group)
                    if not first:
                        state[key].zero_()
        tp_group = ps.get_tensor_model_parallel_group()
        if torch.distributed.get_world_size(tp_group) > 1:
            first = ps.get_tensor_model_parallel_rank() == 0
            for key in sorted(self.saliency.state):  # partial, zero-padded sums: they add up
                dist_pruning.all_reduce_(self.saliency.state[key], group=tp_group)
                if not first:
                    self.saliency.state[key].zero_()
        pp_group = ps.get_pipeline_model_parallel_group()
        if torch.distributed.get_world_size(pp_group) > 1:  # each stage: its own layers' sums
            first = ps.get_pipeline_model_parallel_rank() == 0
            for state in (self.saliency.state, {"layer_cos": self.layer_cos}):
                for key in sorted(state):
                    dist_pruning.all_reduce_(state[key], group=pp_group)
                    if not first:
                        state[key].zero_()

    def _tp_local_hessians(self) -> bool:
        """Whether model-parallel ranks hold different Hessians (TP: their own columns; PP: their
        own layers), so that each saves its own."""
        return self.cfg.parallel.tp > 1 or self.cfg.parallel.pp > 1

    def _local_obs_state(self) -> dict:
        return {
            "hessians": {k: v.clone() for k, v in self.hessians.state_dict().items()},
            # The downdated H^-1 of the current compaction cycle: recomputing it on resume from
            # the newer Hessian would change the OBS updates that follow.
            "obs_cache": {k: (list(a), h.clone()) for k, (a, h) in self._obs_cache.items()},
        }

    def state_dict(self) -> dict:
        """The state every rank shares (saved once, by rank 0, after ``consolidate``)."""
        state = {
            "arch": self.arch.to_dict(),
            "masks": {k: v.clone() for k, v in self.masks.items()},
            "saliency": {k: v.clone() for k, v in self.saliency.state_dict().items()},
            "events": self.events,
            "history": list(self.history),
            "layer_cos": self.layer_cos.clone(),
        }
        if not self._tp_local_hessians():
            state.update(self._local_obs_state())
        return state

    def rank_state_dict(self) -> Optional[dict]:
        """What differs between TP ranks and must be saved by each (None at TP=1): the Hessians
        of this rank's o_proj / down_proj columns and their cached inverses."""
        return self._local_obs_state() if self._tp_local_hessians() else None

    def load_rank_state_dict(self, state: Optional[dict]) -> None:
        """This rank's own ``rank_state_dict`` (after ``load_state_dict``)."""
        if not self._tp_local_hessians():
            return
        if state is None:
            raise UserError("the checkpoint has no per-rank pruning state for this rank; resume with the "
                            "layout it was written with")
        self.hessians = obs_mod.HessianAccumulator()
        self.hessians.load_state_dict(state["hessians"])
        self._obs_cache = dict(state.get("obs_cache", {}))

    def load_state_dict(self, state: dict) -> None:
        """Load a state saved after ``consolidate`` (by rank 0): the other DP ranks start their
        sums from zero, and so do the other TP ranks' saliency sums."""
        first = first_tp = first_pp = True
        if torch.distributed.is_initialized():
            from megatron.core import parallel_state as ps

            first = ps.get_data_parallel_rank() == 0
            first_tp = ps.get_tensor_model_parallel_rank() == 0
            first_pp = ps.get_pipeline_model_parallel_rank() == 0
        state = dict(state)
        state.setdefault("hessians", {})
        if not (first and first_tp and first_pp):
            state["saliency"] = {k: torch.zeros_like(v) for k, v in state["saliency"].items()}
        if not first:
            state["hessians"] = {k: torch.zeros_like(v) for k, v in state["hessians"].items()}
        self.arch = Architecture.from_dict(state["arch"])
        self.masks = state["masks"]
        self.saliency = GradSaliency(self.arch, estimators=(self.p.estimator,))
        self.saliency.load_state_dict(state["saliency"])
        self.hessians = obs_mod.HessianAccumulator()
        self.hessians.load_state_dict(state["hessians"])
        self.events = state["events"]
        self.history = list(state["history"])
        self.layer_cos = (state["layer_cos"].clone() if first and first_pp
                          else torch.zeros_like(state["layer_cos"]))
        self._obs_cache = dict(state.get("obs_cache", {}))
