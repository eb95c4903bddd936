"""The training loop: pruning-aware pretraining on a megatron-core model in a training engine
(``parallel.engine``: DeepSpeed ZeRO).

    run(load_config("configs/tiny_cpu.yaml", ["run_dir=runs/x"]))

One step: forward/backward of ``global_batch / (micro_batch * dp)`` micro-batches on the engine
-> saliency reads the fresh gradients -> optimizer step -> (schedule) prune event: mask and
OBS-update -> (every K events) compaction: slice weights and Adam state, rebuild the engine ->
log -> checkpoint. At the end the model is exported as an HF folder and evaluated.

Parallelism: ZeRO over the data-parallel group, megatron tensor parallelism (parallel.tp) and
pipeline parallelism (parallel.pp: a 1F1B schedule over megatron-core's point-to-point
communication whose gradients reach the engine in one backward per step, training.pipeline)
inside each replica. The loop speaks to the engine through ``engine.base.TrainEngine`` and
reduces through ``parallel.comm`` only.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional, Union

import torch
from tqdm import tqdm

from megatron_effllm.architecture import Architecture
from megatron_effllm.data.loader import make_heldout_batches, make_train_iterator
from megatron_effllm.data.prepare import prepare_data
from megatron_effllm.engine import build_engine
from megatron_effllm.engine.base import EngineOptions, TrainEngine
from megatron_effllm.errors import UserError
from megatron_effllm.log import get_logger, setup_logging
from megatron_effllm.model.builder import Recompute, build_gpt_model
from megatron_effllm.model.weights import gather_canonical, load_canonical, load_canonical_masters
from megatron_effllm.parallel import comm
from megatron_effllm.parallel.runtime import comm_timeout_s, init_model_parallel
from megatron_effllm.training import checkpoint as ckpt
from megatron_effllm.training import faults, preemption, preflight, run_dir
from megatron_effllm.training.config import RunConfig, save_config
from megatron_effllm.training.export import Snapshots, write_model
from megatron_effllm.training.fault_injection import inject_nonfinite, inject_nonfinite_weights, kill_point
from megatron_effllm.training.metrics import MetricsLogger, plot_run
from megatron_effllm.training.pipeline import PipelineStep, mark_replicated_copies, mean_token_loss
from megatron_effllm.training.runtime.factory import make_runtime
from megatron_effllm.training.schedules import learning_rate
from megatron_effllm.training.source import load_source
from megatron_effllm.training.teacher import Teacher
from megatron_effllm.training.teacher_cache import CachedTeacher, build_distiller

log = get_logger(__name__)


def check_pipeline(cfg: RunConfig) -> None:
    """A UserError for what pipeline parallelism cannot run (the dry run refuses the same)."""
    par = cfg.parallel
    if par.pp > 1 and par.zero_stage not in (1, 2):
        raise UserError(
            f"parallel.pp={par.pp} needs parallel.zero_stage 1 or 2 (got {par.zero_stage}): ZeRO-3 "
            "partitions each stage's parameters, and without ZeRO the engine's clipping counts only "
            "the first stage's replicated tensors"
        )
    if par.pp > 1 and cfg.prune.strategy != "none" and cfg.prune.allow_depth:
        raise UserError(
            f"prune.allow_depth=true with parallel.pp={par.pp}: removing layers would move layers "
            "between pipeline stages; set prune.allow_depth=false or parallel.pp=1"
        )


def grad_accumulation(cfg: RunConfig, dp_size: int) -> int:
    """Micro-batches per step and data-parallel rank; a UserError when the global batch does
    not split evenly (the dry run plans with the same rule)."""
    d = cfg.data
    per_pass = d.micro_batch * dp_size
    if d.global_batch % per_pass:
        raise UserError(
            f"data.global_batch {d.global_batch} must be a multiple of micro_batch x data-parallel "
            f"size = {d.micro_batch} x {dp_size}"
        )
    return d.global_batch // per_pass


def engine_options(cfg: RunConfig, grad_accum: int) -> EngineOptions:
    """The training engine's options for ``cfg`` (the dry run builds its DeepSpeed JSON from them)."""
    o = cfg.optim
    return EngineOptions(
        micro_batch=cfg.data.micro_batch, grad_accum=grad_accum,
        zero_stage=cfg.parallel.zero_stage, bf16=cfg.model.dtype == "bf16",
        fp32_grad_accum=cfg.model.fp32_grad_accum, overlap_comm=cfg.parallel.overlap_comm,
        clip_grad=o.clip_grad, lr=o.lr, weight_decay=o.weight_decay,
        betas=(o.beta1, o.beta2), eps=o.eps,
    )


class Trainer:
    rollback: Optional[faults.Rollback] = None  # set when run() restarts after non-finite steps
    rollbacks = 0
    # distill.alpha > 0: built once, kept through compactions and rollbacks
    teacher: Union[Teacher, CachedTeacher, None] = None

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._init_distributed()
        dims = comm.dims()
        self.dp_rank, self.dp_size = dims.dp_rank, dims.dp
        self.is_main = comm.global_rank() == 0
        d = cfg.data
        self.grad_accum = grad_accumulation(cfg, self.dp_size)
        self.run_dir = cfg.run_dir
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.metrics = None  # opened once the run really starts (a refused start writes nothing)
        self.pipeline = None
        if cfg.parallel.pp > 1:
            self.pipeline = PipelineStep(seq_len=d.seq_len, micro_batch=d.micro_batch)
        self.lock = run_dir.claim(self.run_dir)  # last: a failed check above leaves nothing locked

    # ------------------------------------------------------------------ set-up
    def _init_distributed(self) -> None:
        check_pipeline(self.cfg)
        par = self.cfg.parallel
        init_model_parallel(par.tp, par.pp, seed=self.cfg.seed, timeout_s=par.comm_timeout_s,
                            sequence_parallel=par.sequence_parallel)

    def _build_model(self, arch: Architecture, canonical: Optional[dict]):
        """The model in the training dtype (megatron's config knows it), before any engine."""
        torch.manual_seed(self.cfg.seed)
        m = self.cfg.model
        model = build_gpt_model(arch, params_dtype=torch.bfloat16 if m.dtype == "bf16" else torch.float32,
                                init_weights=canonical is None,
                                use_te={"auto": None, "te": True, "local": False}[m.layers],
                                recompute=Recompute(m.recompute, m.recompute_method, m.recompute_num_layers),
                                sequence_parallel=self.cfg.parallel.sequence_parallel)
        if canonical is not None:
            load_canonical(model, arch, canonical)
        if self.pipeline is not None:
            mark_replicated_copies(model)
        return model

    def _engine_options(self) -> EngineOptions:
        return engine_options(self.cfg, self.grad_accum)

    # ------------------------------------------------------------------ model calls
    def _loss(self, engine: TrainEngine, batch: dict) -> torch.Tensor:
        device = next(engine.module.parameters()).device
        tokens = batch["tokens"].to(device)
        labels = batch["labels"].to(device)
        if self.teacher is not None:  # from the vocabulary-parallel logits [b, s, V / TP]
            positions = batch["position_ids"].to(device)
            return mean_token_loss(self.teacher.loss(engine(tokens, positions, None), tokens, positions, labels), batch)
        per_token = engine(tokens, batch["position_ids"].to(device), None, labels=labels)
        return mean_token_loss(per_token, batch)

    @torch.no_grad()
    def heldout_losses(self, engine: TrainEngine) -> dict[str, float]:
        """Mean token loss per held-out domain, identical on every rank."""
        batches = make_heldout_batches(self.data_args, self.cfg.data.heldout_batches,
                                       self.cfg.data.micro_batch, self.dp_rank, self.dp_size)
        was = engine.module.training
        engine.module.eval()
        out = {}
        for domain, items in batches.items():
            tot = torch.zeros(2, dtype=torch.float64)
            device = next(engine.module.parameters()).device
            for batch in self._same_count_over_dp(engine, items):
                if batch is None:  # a forward for ZeRO-3's collective parameter gathers only
                    s = self.cfg.data.seq_len
                    engine.module(torch.zeros(1, s, dtype=torch.long, device=device),
                                  torch.arange(s, device=device).unsqueeze(0), None)
                    continue
                if self.pipeline is not None:  # the last stage has the loss; the others add zeros
                    per_token = self.pipeline.forward(engine.module, batch)
                    if per_token is None:
                        continue
                else:
                    per_token = engine.module(batch["tokens"].to(device), batch["position_ids"].to(device),
                                              None, labels=batch["labels"].to(device))
                mask = batch["loss_mask"].to(device).float()
                tot += torch.tensor([float((per_token.float() * mask).sum()), float(mask.sum())],
                                    dtype=torch.float64)
            comm.all_reduce_(tot, "world")
            out[domain] = float(tot[0] / tot[1].clamp(min=1))
        engine.module.train(was)
        return out

    def _same_count_over_dp(self, engine: TrainEngine, items: list) -> list:
        """``items`` padded with None to the longest list over the data-parallel ranks under
        ZeRO-3, whose every forward gathers parameters collectively (the held-out batches are
        dealt round-robin, so the ranks can hold different counts)."""
        if engine.zero_stage() != 3 or self.dp_size == 1:
            return items
        n = torch.tensor([len(items)], dtype=torch.int64)
        comm.all_reduce_(n, "dp", "max")
        return list(items) + [None] * (int(n) - len(items))

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.time()
        arch, canonical, tokenizer = load_source(self.cfg)
        self.source_arch = arch
        self.tokenizer = tokenizer
        # Cheap checks of the inputs against each other first, before any expensive work.
        preflight.check_tensor_parallel(cfg, arch)
        pruning = make_runtime(cfg, arch, arch.num_params())
        preflight.check_prune_target(cfg, arch, pruning.target)
        self.snapshots = Snapshots(cfg, pruning.source_params, pruning.target, tokenizer, None, self.is_main)
        if self.rollback is None:
            self.fingerprint = run_dir.fingerprint(cfg, arch, tokenizer, comm.world_size())
            self.settings = run_dir.settings(cfg)
        start = run_dir.choose_start(cfg, self.ckpt_root, self.fingerprint, self.settings,
                                     rollback_folder=self.rollback.folder if self.rollback else None)
        self.data_args = prepare_data(
            cfg.data, tokenizer=tokenizer, out_dir=os.path.join(self.run_dir, "data"), seed=cfg.seed,
            train_samples=cfg.train.steps * cfg.data.global_batch, progress=self.is_main,
        )
        preflight.check_data_tokens(self.data_args, arch, tokenizer, cfg.data.eos_token)
        if cfg.distill.alpha > 0 and self.teacher is None:
            self.teacher = build_distiller(cfg, arch, canonical, tokenizer, self.run_dir)
        # The inputs passed every check: the run really starts here.
        if start.move_aside:
            run_dir.move_aside(self.run_dir)
        if self.metrics is None:
            self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main)
        start_step, trainer_state, resume_dir = 0, start.trainer_state, start.folder
        self.snapshots.metrics = self.metrics
        self.snapshots.load_state_dict(trainer_state.get("snapshots"))  # written before this start
        if resume_dir is not None:
            arch = Architecture.from_json(start.arch_json)
            canonical = None
            start_step = trainer_state["step"]
            pruning.load_state_dict(trainer_state["pruning"])
            if self.rollback is not None:  # the data stream goes on past the batches that failed
                trainer_state["data"] = self.rollback.data_state
        model = self._build_model(arch, canonical)
        engine = build_engine(cfg.parallel.engine, model, self._engine_options())
        del model  # the engine owns it; a compaction replaces it
        if canonical is not None and engine.options.bf16:  # masters from the source's own values
            load_canonical_masters(engine, arch, canonical)
        del canonical
        if resume_dir is not None:
            # another layout loads from the portable state, or is refused in one line
            ckpt.load_engine_state(engine, resume_dir, arch)
            ckpt.load_rank_states(pruning, engine, resume_dir)
            log.info(f"[resume] continuing from {resume_dir} at step {start_step}")
        pruning.install(engine)
        data_iter = make_train_iterator(self.data_args, self.dp_rank, self.dp_size, cfg.data.micro_batch,
                                        cfg.data.global_batch, start_state=trainer_state.get("data"))
        if "source_heldout" in trainer_state:
            self.source_heldout = trainer_state["source_heldout"]
        else:
            self.source_heldout = self.heldout_losses(engine)
        ref = cfg.data.reference_losses
        self.reference = ({d: float(ref.get(d, v)) for d, v in self.source_heldout.items()}
                          if isinstance(ref, dict) else dict(self.source_heldout))
        if data_iter.sampler is not None and hasattr(data_iter.sampler, "set_reference_losses"):
            data_iter.sampler.set_reference_losses(self.reference)
        if self.is_main:  # only once the run has really started: a failed start changes nothing
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self.snapshots.take_due(engine, pruning, start_step, self.heldout_losses)  # added on a resume
        log.info(f"[run] {arch.num_params():,} parameters, target {pruning.target:,}; "
             f"{cfg.train.steps} steps x {cfg.data.global_batch} x {cfg.data.seq_len} tokens; "
             f"DP={self.dp_size} TP={cfg.parallel.tp} PP={cfg.parallel.pp} ZeRO-{cfg.parallel.zero_stage} {cfg.model.dtype}")

        bar = None
        if cfg.train.progress_bar and self.is_main:
            bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True)
        tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
        consumed = trainer_state.get("consumed_tokens", start_step * tokens_per_step)
        guard = faults.StepGuard(cfg.train, self.ckpt_root, rollbacks_done=self.rollbacks, metrics=self.metrics)
        timing = {"train": 0.0, "prune": 0.0, "compact": 0.0}
        loss_val = float("nan")
        watch = preemption.Watch(cfg.train.preempt_check_s, start_step)
        for step in range(start_step, cfg.train.steps):
            t0 = time.time()
            lr = learning_rate(step, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
                               warmup=cfg.optim.warmup_steps, total=cfg.train.steps,
                               schedule=cfg.optim.schedule, decay_fraction=cfg.optim.decay_fraction)
            engine.set_learning_rate(lr)
            in_window = pruning.collects(step)
            # The engine divides the loss by the accumulation steps before backward.
            pruning.start_step(in_window, samples_per_rank=cfg.data.global_batch / self.dp_size,
                               grad_scale=float(self.grad_accum), step=step)
            if self.pipeline is not None:
                loss_t = self.pipeline.train(
                    engine, [next(data_iter) for _ in range(self.grad_accum)],
                    loss_hook=lambda loss: inject_nonfinite(loss, step + 1),
                    extra_leaves=pruning.extra_grad_leaves(), teacher=self.teacher, paused=pruning.paused,
                    after_micro_batch=lambda b: pruning.end_micro_batch(float(b["tokens"].shape[0])),
                    before_backward=pruning.before_micro_batch_backward,
                    after_schedule=pruning.end_pipeline_schedule)
            else:
                losses = []
                for k in range(self.grad_accum):
                    batch = next(data_iter)
                    loss = inject_nonfinite(self._loss(engine, batch), step + 1)
                    # One engine.step() per global batch: the last backward ends it.
                    engine.backward(loss, last_micro_batch=k == self.grad_accum - 1)
                    pruning.end_micro_batch(float(batch["tokens"].shape[0]))
                    losses.append(loss.detach().float())
                # The graph's leaves are the parameters: a loss kept past the step would keep the
                # engine alive through a compaction (and its memory with it).
                del loss
                loss_t = torch.stack(losses).mean()
            comm.all_reduce_(loss_t, "world")
            loss_t /= comm.world_size()
            # The update, or (non-finite loss or gradients on any rank) a skipped one: decided on
            # the device, so that a step that logs, prunes and saves nothing reads nothing back.
            guard.finish_step(engine, pruning, step + 1, loss_t, data_iter)
            del loss_t
            inject_nonfinite_weights(engine, step + 1)
            consumed += tokens_per_step
            timing["train"] += time.time() - t0
            done = step + 1
            record = None
            if (pruning.event_due(done) or done % cfg.train.log_interval == 0 or done == cfg.train.steps
                    or done % cfg.train.eval_interval == 0 or done % cfg.train.checkpoint_interval == 0
                    or (data_iter.sampler is not None and data_iter.sampler.update_due)):
                # the steps since the last such step, in one read: counted, logged, raised on
                loss_val = guard.resolve(engine, pruning)
            if pruning.event_due(done):
                t1 = time.time()
                record = pruning.prune_event(engine, done)
                kill_point("prune.after_event", done)
                timing["prune"] += time.time() - t1
                if record is not None:
                    self.metrics.log({**record, "kind": "architecture"})
                if pruning.compaction_due(done):
                    t2 = time.time()
                    engine = self._compact(engine, pruning, done)
                    timing["compact"] += time.time() - t2
                self.snapshots.take_due(engine, pruning, done, self.heldout_losses)
            if done % cfg.train.eval_interval == 0 and done != cfg.train.steps:
                self.metrics.log({"kind": "eval", "step": done, "tokens": consumed,
                                  "heldout_loss": self.heldout_losses(engine)})
            if data_iter.sampler is not None and data_iter.sampler.update_due:
                held = self.heldout_losses(engine)
                weights = data_iter.update_domain_weights(held)
                self.metrics.log({"kind": "domains", "step": done, "heldout_loss": held, "weights": weights})
            if done % cfg.train.log_interval == 0 or done == cfg.train.steps:
                dt = time.time() - t0
                params = pruning.current_params()  # the expected size while L0 gates are soft
                rec = {"kind": "train", "step": done, "loss": loss_val, "lr": lr,
                       "params": params, "tokens": consumed,
                       "tokens_per_s": tokens_per_step / max(dt, 1e-9), **pruning.step_metrics(done)}
                if data_iter.sampler is not None:
                    rec["domain_weights"] = dict(zip(self.data_args.domains, map(float, data_iter.sampler.weights)))
                self.metrics.log(rec)
                msg = (f"step {done}/{cfg.train.steps} loss {loss_val:.4f} lr {lr:.2e} "
                       f"params {params / 1e6:.2f}M tok/s {rec['tokens_per_s']:.0f}")
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss_val:.3f} params {params / 1e6:.1f}M")
                else:
                    log.info(msg)
                if record is not None:
                    eff = pruning.effective_arch()
                    log.info(f"[prune] step {done}: {eff.widths_summary()} hidden {eff.hidden_size}")
            if bar is not None:
                bar.update(1)
            kill_point("step.end", done)
            stop = watch.requested(done)  # collective on its check steps
            if stop or done % cfg.train.checkpoint_interval == 0 or done == cfg.train.steps:
                loss_val = guard.resolve(engine, pruning)  # a checkpoint holds no unread step
                folder = self._save(engine, pruning, data_iter, done, consumed)
            if stop:
                preemption.stop(stop, done, folder, self.metrics, bar)
        if bar is not None:
            bar.close()
        # Whatever is still only masked goes now, so the exported model is the small one.
        if not pruning.effective_plan().is_identity:
            t2 = time.time()
            engine = self._compact(engine, pruning, cfg.train.steps)
            timing["compact"] += time.time() - t2
        summary = self._finish(engine, pruning, timing, time.time() - t_start, loss_val)
        self.metrics.close()
        return summary

    def _compact(self, engine: TrainEngine, pruning, step: Optional[int] = None) -> TrainEngine:
        plan = pruning.compaction_plan()
        slice_state = pruning.slice_engine_state(plan)

        def sliced(pairs):  # fault-injection points around the old engine's destruction
            yield from slice_state(pairs)
            kill_point("compact.after_gather", step)

        pruning.detach()  # no reference to the old model may outlive its engine
        # The old engine is gone (its memory returned) before the new model is built.
        engine = engine.rebuild(lambda: self._build_model(plan.after, None), sliced,
                                carry_optimizer_state=self.cfg.prune.optimizer_state == "carry",
                                after_destroy=lambda: kill_point("compact.after_destroy", step))
        pruning.after_compaction(plan)
        pruning.install(engine)
        self.metrics.log({"kind": "compaction", "params": plan.after.num_params(),
                          "architecture": plan.after.to_dict()})
        return engine

    def _save(self, engine: TrainEngine, pruning, data_iter, step: int, consumed: int) -> str:
        state = {
            "step": step,
            "consumed_tokens": consumed,
            "pruning": pruning.state_dict(),
            "data": data_iter.state_dict(),
            "reference_losses": self.reference,
            "source_heldout": self.source_heldout,
            "fingerprint": self.fingerprint,  # what a resume must not change (run_dir)
            "settings": self.settings,
            "snapshots": self.snapshots.state_dict(),
        }
        return ckpt.save(engine, self.ckpt_root, step, architecture_json=pruning.arch.to_json(),
                         trainer_state=state, keep=self.cfg.train.keep_checkpoints,
                         rank_state=pruning.rank_state_dict(),
                         dp_shared_state=pruning.dp_shared_state_dict() if self.dp_rank == 0 else None,
                         portable_arch=pruning.arch if self.cfg.train.portable_checkpoint else None)

    def _finish(self, engine: TrainEngine, pruning, timing: dict, wall: float, last_loss: float) -> dict:
        """Gather the canonical weights (over TP: collective), evaluate; rank 0 writes the results."""
        arch = pruning.arch
        with engine.gathered():
            canonical = gather_canonical(engine.module, arch)
        held = self.heldout_losses(engine)
        # Identical on every rank (full canonical weights, all-reduced losses): all raise or none.
        faults.check_final_model(canonical, held, os.path.join(self.run_dir, "final"), self.ckpt_root)
        if pruning.waiting:
            log.warning(f"[prune] the run ended with a prune event waiting for statistics (the last steps "
                        f"were skipped as non-finite): {arch.num_params():,} parameters, above the target "
                        f"{pruning.target:,}")
        summary = {
            "source_params": self.source_arch.num_params(),
            "final_params": arch.num_params(),
            "final_nonembedding_params": arch.num_params(include_embeddings=False),
            "widths": arch.widths_summary(),
            "hidden_size": arch.hidden_size,
            "final_loss": last_loss,
            "heldout_ppl_source": {d: math.exp(v) for d, v in self.source_heldout.items()},
            "heldout_ppl_final": {d: math.exp(v) for d, v in held.items()},
            "seconds": {k: round(v, 2) for k, v in timing.items()} | {"wall": round(wall, 1)},
            "snapshots": self.snapshots.state_dict(),
        }
        if self.snapshots.unreached():
            log.warning(f"[snapshot] never reached: {', '.join(f'{f:g}' for f in self.snapshots.unreached())} "
                        f"of the source's {self.source_arch.num_params():,} parameters")
        if self.is_main:
            final = os.path.join(self.run_dir, "final")
            os.makedirs(final, exist_ok=True)
            arch.save(os.path.join(final, "architecture.json"))
            if self.cfg.export.hf:
                summary.update(write_model(arch, canonical, final, self.tokenizer, self.cfg.export))
            self.metrics.log({"kind": "architecture", "step": self.cfg.train.steps,
                              "params": arch.num_params(), "architecture": arch.to_dict()})
            self.metrics.log({"kind": "summary", **summary})
            summary["plots"] = plot_run(self.run_dir)
            with open(os.path.join(final, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary


def run(cfg: RunConfig) -> dict:
    """Train; a lost peer becomes a one-line PeerFailure, a rollback restarts the loop, SIGTERM or
    SIGUSR1 on any rank a checkpoint and ``preemption.Preempted`` on every rank."""
    setup_logging()
    with faults.peer_failures(comm_timeout_s(cfg.parallel.comm_timeout_s), os.path.join(cfg.run_dir, "logs")), \
            preemption.signals():
        trainer = Trainer(cfg)
        try:
            while True:
                try:
                    return trainer.run()
                except faults.Rollback as rb:
                    trainer.rollback = rb
                    trainer.rollbacks += 1
        finally:
            if trainer.lock is not None:
                trainer.lock.release()
