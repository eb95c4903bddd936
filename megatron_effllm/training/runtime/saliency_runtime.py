"""Saliency-driven pruning inside a training run (prune.strategy efficientllm / uniform / adapt).

Per step (after backward, before the optimizer step) the gradient hooks fold the step's own
weights and gradients into the scores, mapped to canonical names (``live_model.GradientFeed``;
the gradients of the training loss: with distill.alpha > 0 those of the distillation objective);
layer Hessians for the OBS update are summed from forward hooks. At a prune event
(``pruning.event.next_plan``) the selector picks, from the scores of the still-unmasked groups
summed over TP, PP and DP, what to remove next to meet the schedule's target; every rank checks
that all chose the same plan before any weight changes; those groups are masked at once
(``live_model.LiveMasks``: the forward is exactly the pruned model's, RMSNorm statistics
included), and OBS compensates the surviving columns of o_proj / down_proj. Every
``compact_every`` events the masked groups are removed physically: weights, fp32 masters and
Adam moments are sliced with the same indices and the engine is rebuilt.

Model parallelism (any TP and PP): OBS keeps the Hessian of the o_proj / down_proj columns this
rank holds (block-diagonal over TP, exact at TP=1); a compaction re-shards each tensor (weights
and Adam moments) through its canonical form, one at a time. Under PP every stage hooks, masks,
OBS-updates and slices its own layers (global layer numbers in the canonical names), and the
layer count stays fixed (prune.allow_depth=false), so no layer moves between stages.
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
from megatron_effllm.parallel.distributed_pruning import check_same_decision, reduce_saliency
from megatron_effllm.parallel.reshard import reshard_block_hessians
from megatron_effllm.pruning import obs as obs_mod
from megatron_effllm.pruning.event import make_selector, next_plan, obs_compensate
from megatron_effllm.pruning.groups import PrunePlan, expand_units
from megatron_effllm.pruning.registry import ESTIMATORS, SELECTORS
from megatron_effllm.pruning.saliency import GradSaliency, GroupScores
from megatron_effllm.pruning.surgery import masks_from_plan
from megatron_effllm.training.runtime.base import RuntimeBase
from megatron_effllm.training.runtime import relayout
from megatron_effllm.training.runtime.live_model import GradientFeed, LiveMasks, recomputing
from megatron_effllm.training.runtime.state import Statistics

log = get_logger(__name__)


class SaliencyRuntime(RuntimeBase):
    """Scores, masks, OBS statistics and the schedule of one training run (any TP, PP)."""

    RUNTIMES = ("saliency", "none")

    def __init__(self, cfg, arch: Architecture, source_params: int):
        super().__init__(cfg, arch, source_params)
        self.stats = self._new_statistics(arch)
        self._masks: Optional[LiveMasks] = None
        self._feed: Optional[GradientFeed] = None
        self._hooks: list = []
        self._collecting = False
        self._collect_hessians = False
        self._grad_scale = 1.0

    def _check_options(self, p) -> None:
        strategy = self.schedule.strategy
        self.selector = SELECTORS.get(strategy.selector) if strategy.selector else None
        if self.enabled and not ESTIMATORS.get(p.estimator).in_training:
            raise UserError(f"prune.estimator {p.estimator!r} needs more than the training gradients; during "
                            f"training use one of {', '.join(ESTIMATORS.names(in_training=True))}")
        # Gradient sums are kept for the estimator only when something is pruned.
        self._estimators = (p.estimator,) if self.enabled else ()

    def _new_statistics(self, arch: Architecture) -> Statistics:
        return Statistics(GradSaliency(arch, estimators=self._estimators), obs_mod.HessianAccumulator(),
                          torch.zeros(arch.num_layers, 2, dtype=torch.float64),
                          cos_split_over_tp=self.cfg.parallel.sequence_parallel)

    # ------------------------------------------------------------------ schedule
    def event_due(self, step: int) -> bool:
        return self.schedule.event_due(step) or self.waiting

    def collects(self, step: int) -> bool:
        # A waiting event needs statistics even past the window's end (and on any step).
        sampled = (step - self.p.start_step) % self.p.stats_every == 0
        return (super().collects(step) and sampled) or self.waiting

    def compaction_due(self, step: int) -> bool:
        if not self.enabled:
            return False
        pending = not self.effective_plan().is_identity
        return pending and (self.events % self.p.compact_every == 0 or step >= self.p.end_step)

    # ------------------------------------------------------------------ hooks on the live model
    def install(self, engine: TrainEngine) -> None:
        """Hooks on the engine's module: masks with the RMSNorm correction, Hessian inputs (OBS),
        block cosines (adapt), and the gradient feed of the scores."""
        model = engine.module
        self._attach(model)
        self.stats.to_device(next(model.parameters()).device)  # loaded from a checkpoint on the CPU
        self._masks = LiveMasks(model, self.dims, engine)
        for name, module in model.named_modules():
            if (self.selector is not None and self.selector.needs_layer_importance
                    and name.startswith("decoder.layers.") and name.count(".") == 2):
                self._hooks.append(module.register_forward_hook(
                    self._block_hook(self.global_layer(int(name.split(".")[2]))), with_kwargs=True))
            if self.p.obs and (name.endswith("self_attention.linear_proj") or name.endswith("mlp.linear_fc2")):
                self._hooks.append(module.register_forward_pre_hook(self._hessian_hook(self._site(name))))
        samples_per_micro = float(self.cfg.data.micro_batch)
        self._feed = GradientFeed(model, self.arch, self.dims, stats=lambda: self.stats.saliency,
                                  scale=lambda: self._grad_scale * samples_per_micro,
                                  collecting=lambda: self._collecting)
        self._masks.set(self.arch, self.masks)

    def remove_hooks(self) -> None:
        for part in (self._masks, self._feed):
            if part is not None:
                part.remove()
        for h in self._hooks:
            h.remove()
        self._masks, self._feed, self._hooks = None, None, []

    def _site(self, module_name: str) -> str:
        # "decoder.layers.3.self_attention.linear_proj" -> "model.layers.{global 3}.self_attn.o_proj.weight"
        parts = module_name.split(".")
        layer = self.global_layer(int(parts[parts.index("layers") + 1]))
        leaf = "self_attn.o_proj.weight" if module_name.endswith("linear_proj") else "mlp.down_proj.weight"
        return f"model.layers.{layer}.{leaf}"

    def _hessian_hook(self, canon_name: str):
        def hook(module, args):
            if module.training and self._collect_hessians and not recomputing():
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                # A strided subset of the tokens: X^T X over every token costs as much as a
                # large matmul per layer, and the EMA over steps supplies the rest.
                stride = max(1, x.shape[0] // self.p.obs_tokens_per_step)
                # added at the step's end, once it is known to count (``Statistics.end_step``)
                self.stats.add_hessian_input(canon_name, x[::stride].to(torch.float32, copy=True))
        return hook

    def _block_hook(self, layer: int):
        """Adapt-Pruner's layer importance: sums of cos(x_in, x_out) per token of a block."""

        def hook(module, args, kwargs, output):
            if not (module.training and self._collecting) or recomputing():
                return
            x_in = (args[0] if args else kwargs["hidden_states"]).detach().float()
            x_out = (output[0] if isinstance(output, tuple) else output).detach().float()
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
            self.stats.layer_cos[layer, 0] += cos.sum().double()
            self.stats.layer_cos[layer, 1] += cos.numel()

        return hook

    # ------------------------------------------------------------------ the loop's calls
    def start_step(self, collecting: bool, samples_per_rank: float, grad_scale: float,
                   step: Optional[int] = None) -> None:
        """Before step ``step``'s micro-batches: decay the running sums once (EMA), arm the hooks.

        ``grad_scale`` undoes the engine's loss scaling for gradient accumulation, so that each
        hooked gradient times ``samples_per_micro`` is a sum over samples; summed over micro-batches
        and data-parallel ranks the state is that of one process over the global batch.
        """
        self._collecting = bool(collecting and self.enabled)
        self._grad_scale = grad_scale
        self._collect_hessians = bool(self._collecting and self.p.obs)
        if self._collecting:  # the Hessians are EMA-weighted like the scores, at end_step
            self.stats.begin_step(self.p.ema if self._collect_hessians else None)
            self.stats.saliency.decay_(self.p.ema)
            self.stats.layer_cos.mul_(self.p.ema)

    def end_micro_batch(self, samples: float) -> None:
        if self._collecting and self.dims.replica_leader:  # one count per model replica
            self.stats.saliency.add_count(samples)

    def extra_grad_leaves(self) -> list:
        """No leaves outside the model: the scores read the model's own gradients."""
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

    def end_step(self, skipped: torch.Tensor) -> None:
        """Keep the step's statistics or put back those before it, on the device (``skipped``)."""
        self.stats.end_step(skipped)

    def discard_step(self) -> None:
        """The step's update was skipped: its statistics went back in ``end_step``."""

    def step_metrics(self, step: int) -> dict:
        return {}

    def before_micro_batch_backward(self, batch: dict) -> None:
        self._feed.before_micro_batch_backward(batch)

    def end_pipeline_schedule(self) -> None:
        self._feed.end_pipeline_schedule()

    # ------------------------------------------------------------------ prune event (masking)
    def _layer_importance(self, eff_plan: PrunePlan) -> torch.Tensor:
        """I_l = -mean cos(x_in, x_out) over data-parallel ranks (and the pipeline stages, each of
        which holds its own layers' sums; under sequence parallelism the TP ranks too, each of
        which saw its slice of the sequence), for the layers still there."""
        groups = ["dp", "pp"] + (["tp"] if self.stats.cos_split_over_tp else [])
        cos = comm.all_reduce_flat([self.stats.layer_cos], groups)[0].cpu()
        mean = cos[:, 0] / cos[:, 1].clamp(min=1.0)
        return -mean[torch.as_tensor(eff_plan.kept_layers)]

    def _scores_of(self, scorer: GradSaliency, eff_plan: PrunePlan) -> GroupScores:
        """The scores of the groups ``eff_plan`` keeps, from the reduced sums ``scorer``."""
        if not eff_plan.is_identity:
            scorer.apply_plan(eff_plan)
        return scorer.scores(self.p.estimator)

    def prune_event(self, engine, step: int) -> Optional[dict]:
        """Mask the next groups to meet the schedule's target after ``step``; OBS-update.

        A skipped (non-finite) step leaves the statistics as they were before it, so an event
        after one reuses the running average of the earlier steps: still scores of the same
        groups. An event with no statistics at all (every step since the window opened was
        skipped) waits instead, step after step, until a step's gradients count; the target
        follows the schedule, so that event catches up on what the waiting ones would have
        removed.
        """
        target = self.target_at(step)
        eff_plan = self.effective_plan()
        scorer = None
        if eff_plan.after.num_params() > target:  # as next_plan: only then are scores needed
            # The sums over TP, PP and DP (tiny vectors); the count is the same on every rank.
            scorer = reduce_saliency(self.stats.saliency)
            # The selection runs on the host (tiny vectors; one copy per event, none per step).
            scorer.state = {k: v.cpu() for k, v in scorer.state.items()}
            if not float(scorer.state["count"]) > 0:
                if not self.waiting:
                    log.warning(f"[prune] step {step}: no saliency statistics yet (every step since the "
                                f"pruning window opened at step {self.p.start_step} was skipped as "
                                "non-finite); the prune event waits for the next step whose update counts")
                self.waiting = True
                return None
            if self.waiting:
                log.info(f"[prune] step {step}: a step's statistics counted; the waiting prune event runs")
        self.waiting = False
        self.events += 1
        select = make_selector(self.selector, self.schedule.constraints(), adapt_step=self.p.adapt_step,
                               layer_importance=lambda: self._layer_importance(eff_plan))
        total = next_plan(eff_plan, target, lambda plan: self._scores_of(scorer, plan), select,
                          agree=check_same_decision)
        if total is None:
            return None
        if self.p.obs and self.stats.hessians.names():
            self._obs_update(engine, eff_plan, total)
        self.masks = masks_from_plan(total)
        self._masks.set(self.arch, self.masks)
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
        communication. Exact at TP=1. Units (heads, FFN channels) are numbered locally, from the
        start of this rank's range.
        """
        params = dict(engine.module.named_parameters())
        d = self.arch.head_dim
        tp_rank, tp = self.dims.tp_rank, self.dims.tp
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
                if not gone or f"xtx.{canon}" not in self.stats.hessians.state:
                    continue
                alive, Hinv = self._obs_inverse(canon, was, unit)
                p = params[meg]
                W, still, Hinv = obs_compensate(engine.full_fp32_param(p), Hinv, alive, gone, unit)
                engine.set_full_param(p, W)
                self.stats.obs_cache[canon] = (still, Hinv)

    def _obs_inverse(self, canon: str, alive_units: list, unit: int):
        """(alive units, H^-1 over their columns) for one weight, from the cache when valid."""
        cached = self.stats.obs_cache.get(canon)
        if cached is not None and cached[0] == alive_units:
            return cached
        cols = expand_units(alive_units, unit)
        H = self._reduced_hessian(canon)[cols][:, cols]
        entry = (list(alive_units), obs_mod.inverse_hessian(H))
        self.stats.obs_cache[canon] = entry
        return entry

    def _reduced_hessian(self, canon: str) -> torch.Tensor:
        """The damped layer Hessian from every data-parallel rank's inputs (identical on all)."""
        acc = obs_mod.HessianAccumulator()
        acc.state = {k: comm.all_reduce_(self.stats.hessians.state[k].clone(), "dp")
                     for k in (f"xtx.{canon}", f"n.{canon}")}
        return acc.hessian(canon, self.p.obs_damp)

    # ------------------------------------------------------------------ compaction
    def slice_engine_state(self, plan: PrunePlan):
        return self._slicer(plan)

    def after_compaction(self, plan: PrunePlan) -> None:
        stats = self.stats
        stats.saliency.apply_plan(plan)
        if stats.hessians.names():
            if self.dims.tp > 1:  # each rank's block of columns, re-cut along the new shards
                stats.hessians.state = reshard_block_hessians(stats.hessians.state, plan)
            else:
                stats.hessians.apply_plan(plan)
        self._reset_shape(plan)
        stats.obs_cache = {}  # column numbering changed; the next event refreshes H^-1
        stats.layer_cos = stats.layer_cos[torch.as_tensor(plan.kept_layers)].clone()
        if self._masks is not None:
            self._masks.clear()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """The state every rank shares (saved once, by rank 0); the running sums are per rank."""
        return {**self._common_state(), "waiting": self.waiting}

    def load_state_dict(self, state: dict) -> None:
        self._load_common_state(state)
        self.waiting = bool(state["waiting"])
        self.stats = self._new_statistics(self.arch)

    def rank_state_dict(self) -> dict:
        """This rank's own running sums (scores, Hessians, layer cosines)."""
        return self.stats.rank_state()

    def dp_shared_state_dict(self) -> Optional[dict]:
        """The cached H^-1, the same on every data-parallel rank of this model shard (None
        outside a compaction cycle's OBS updates: nothing to write)."""
        return self.stats.dp_shared_state() if self.stats.obs_cache else None

    def load_rank_state_dict(self, state: Optional[dict], dp_shared: Optional[dict] = None) -> None:
        """This rank's own ``rank_state_dict`` and its DP rank 0's ``dp_shared_state_dict``
        (after ``load_state_dict``)."""
        if state is None:
            raise UserError("the checkpoint has no per-rank pruning state for this rank; resume with the "
                            "layout it was written with")
        self.stats.load_rank_state(state, dp_shared)

    def load_other_layout(self, old: list) -> None:
        """The running statistics of a checkpoint written at another (DP, TP, PP) layout, from
        every old rank's ``(dims, rank_state_dict, dp_shared_state_dict)`` (``relayout``);
        after ``load_state_dict``."""
        now, layers = comm.dims(), self.arch.num_layers
        stats = self.stats
        stats.saliency.load_state_dict(relayout.saliency_sums(old, now, comm.global_rank()))
        stats.layer_cos = relayout.layer_cos(old, now, stats.cos_split_over_tp)
        stats.hessians = obs_mod.HessianAccumulator()
        stats.hessians.load_state_dict(relayout.hessians(old, now, layers))
        stats.obs_cache = relayout.obs_cache(old, now, layers)
