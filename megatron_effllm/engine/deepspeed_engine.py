"""The ``TrainEngine`` over DeepSpeed ZeRO (stages 0-3), and its rebuild after a structured prune.

The only module of the package that imports ``deepspeed`` (with its helpers ``_zero_params``,
``_deepspeed_checkpoint`` and ``deepspeed_mpu``).

A prune changes parameter shapes, which ZeRO's flat partitions cannot follow in place. So the
engine is rebuilt, one parameter at a time so that no rank ever holds the whole model's state:
each parameter's fp32 master and Adam moments are gathered in full (collectively, on every
data-parallel rank), sliced with the same kept indices as the weight, and kept on the host by one
data-parallel rank only (parameter i by rank i mod DP); then the old engine is destroyed and its
memory released, the new model is built, and each kept parameter is broadcast from its holder
and written into the new engine's partitions; the step count is kept. The slicing itself is a
function supplied by the caller (the pruning runtime): this module knows nothing of pruning.
Under tensor parallelism "full" means full over the data-parallel group: each TP rank gathers
and sets its own shards, and the caller's function re-shards between them.

Checkpoints go through ``_deepspeed_checkpoint`` (CPU copies written, restricted unpickling,
every file checked before any rank reads one).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import io
import logging
import os
from collections.abc import Mapping
from typing import Callable, Iterator, Optional

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.utils import has_inf_or_nan
from deepspeed.runtime.zero import parameter_offload
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from deepspeed.utils import safe_get_full_optimizer_state
from megatron.core import parallel_state

from megatron_effllm.engine import _zero_params as zp
from megatron_effllm.engine._deepspeed_checkpoint import RestrictedCheckpointEngine, check_engine_files
from megatron_effllm.engine.base import EngineOptions
from megatron_effllm.engine.deepspeed_mpu import MegatronMPU
from megatron_effllm.parallel import comm

OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq")
CHECKPOINT_TAG = "ds"  # the sub-folder of a checkpoint DeepSpeed writes into
def _skip_cpu_shm_build() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce op at init (about a minute).

    gloo does the same job, so the build is skipped. Nothing changes on CUDA.
    """
    if torch.cuda.is_available():
        return
    # importlib, not `import deepspeed.comm.torch`: the package re-exports the name `torch`.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def deepspeed_config(options: EngineOptions) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": options.micro_batch,
        "gradient_accumulation_steps": options.grad_accum,
        "zero_optimization": {"stage": options.zero_stage},
        "bf16": {"enabled": bool(options.bf16)},
        "gradient_clipping": options.clip_grad if options.clip_grad > 0 else 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if options.bf16 and options.fp32_grad_accum:
        # As megatron does with bf16: micro-batch gradients summed and reduced over data
        # parallelism in fp32 (a bf16 reduction would round the fp32 sums again). DeepSpeed 0.19
        # sums in its BF16 optimizer at ZeRO-1 and in ZeRO's own buffers at 2 and 3; without ZeRO
        # it has no such mode (refused by the config check).
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
    if options.overlap_comm is not None and options.zero_stage > 0 and torch.cuda.is_available():
        # Only CUDA has streams to overlap on; on the CPU DeepSpeed's default stays (and with it
        # the CPU runs' numbers).
        cfg["zero_optimization"]["overlap_comm"] = bool(options.overlap_comm)
    if options.zero_stage == 3:
        # Keep whole parameters resident: the models this runs are pruned to fit anyway, and
        # prefetch thresholds tuned for GPUs only add latency here.
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0)
    return cfg


def make_optimizer(model: torch.nn.Module, options: EngineOptions) -> torch.optim.Optimizer:
    """AdamW with no weight decay on norms and biases (1-D parameters), as is standard."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": options.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # A client torch AdamW: DeepSpeed's own "AdamW" would JIT-compile a CPU kernel on CPU.
    # fused: one kernel over all tensors, and the only torch AdamW that takes ``found_inf``, with
    # which a non-finite step is skipped on the device (``DeepSpeedEngine.step_unless``).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=options.lr, betas=options.betas,
                             eps=options.eps, fused=True)


def _initialize(model: torch.nn.Module, options: EngineOptions):
    _skip_cpu_shm_build()
    # A single process started without a launcher: DeepSpeed insists on the launcher's variable.
    os.environ.setdefault("LOCAL_RANK", "0")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # With megatron's groups, ZeRO partitions over its data-parallel group and clipping reduces
    # over its model-parallel group; without them every rank is data-parallel.
    mpu = MegatronMPU() if parallel_state.model_parallel_is_initialized() else None
    # DeepSpeed's BF16 optimizer prints memory reports with print() (forced, at every build)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model, options), config=deepspeed_config(options),
            mpu=mpu, model_parameters=None,
        )
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed chose the {type(engine.checkpoint_engine).__name__}; only its torch "
                           "checkpoint engine has a restricted replacement")
    engine.checkpoint_engine = RestrictedCheckpointEngine(engine._config)
    return engine


class _GatheredOnRead(Mapping):
    """One parameter's full state whose values are gathered (collectively) each time they are
    read; ``pop`` reads and forgets a key."""

    def __init__(self, keys, gather):
        self._keys, self._gather = list(keys), gather

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._gather(key)

    def __iter__(self):
        return iter(list(self._keys))

    def __len__(self):
        return len(self._keys)

    def pop(self, key):
        value = self[key]
        self._keys.remove(key)
        return value


def _forget_zero3_module(module: torch.nn.Module) -> None:
    """DeepSpeed's ZeRO-3 keeps two references that its destroy() leaves behind (0.19), each of
    which keeps the whole old engine alive through the module's hooks: the root module on a
    module-level stack, and the parameter coordinator's class-level lru_cache of sub-modules."""
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    for attr in vars(PartitionedParameterCoordinator).values():
        # the cache sits under DeepSpeed's nvtx wrapper, in its closure
        for inner in (attr, *(c.cell_contents for c in getattr(attr, "__closure__", None) or ())):
            if hasattr(inner, "cache_clear"):
                inner.cache_clear()


class DeepSpeedEngine:
    """``TrainEngine`` over a ``deepspeed.DeepSpeedEngine`` with a client AdamW."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, options: EngineOptions):
        self.options = options
        self._ds = _initialize(model, options)

    @property
    def module(self) -> torch.nn.Module:
        return self._ds.module

    def __call__(self, *args, **kwargs):
        return self._ds(*args, **kwargs)

    # ------------------------------------------------------------------ the step
    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool, scale_with_accumulation: bool = True) -> None:
        # One engine step per global batch: DeepSpeed reduces gradients at the boundary.
        self._ds.set_gradient_accumulation_boundary(last_micro_batch)
        self._ds.backward(loss, scale_wrt_gas=scale_with_accumulation)

    def step(self) -> None:
        self._ds.step()

    def _inner_optimizer(self):
        opt = self._ds.optimizer
        return getattr(opt, "optimizer", opt)

    def step_unless(self, bad: torch.Tensor) -> torch.Tensor:
        """Apply the step, or skip it when ``bad`` (this rank's flag on the device, e.g. a
        non-finite loss) is set on any rank or any gradient the step applies is not finite.

        A skipped step clears the gradients as any step does; weights, Adam moments and the Adam
        step count stay as they were. The decision never leaves the device: the agreed flag is
        the optimizer's ``found_inf`` (as torch's GradScaler passes it), with which the fused
        AdamW kernel changes nothing and takes its step count back. Returns that flag (1.0:
        skipped) for whoever reads it later."""
        flag = torch.maximum(self._local_nonfinite_grads(), bad.detach().reshape(1).to(torch.float32))
        comm.all_reduce_(flag, "world", "max")
        inner = self._inner_optimizer()
        for group in inner.param_groups:  # a checkpoint of a foreach AdamW loads its flags back
            group["fused"], group["foreach"] = True, False
        inner.found_inf = flag.reshape(())
        try:
            self._ds.step()
        finally:
            del inner.found_inf
        return flag

    def _local_nonfinite_grads(self) -> torch.Tensor:
        """1.0 on the device when a gradient this rank holds for the coming step is not finite.
        The BF16 optimizer's fp32 sums (bf16 with fp32 accumulation at ZeRO-1: the module's
        ``.grad`` holds the last micro-batch's only); under ZeRO the optimizer's reduced
        partitions (DeepSpeed's own check, less its host read); otherwise the module's ``.grad``."""
        device = next(self.module.parameters()).device
        opt = self._ds.optimizer
        stage = self.zero_stage()
        grads = getattr(opt, "fp32_groups_gradients_flat", None)
        if grads is None and stage in (1, 2):
            return opt.has_overflow_partitioned_grads_serial().reshape(1).float().to(device)
        if grads is None and stage == 3:
            return (~torch.isfinite(opt.grad_partitions_flat_buffer).all()).reshape(1).float().to(device)
        if grads is None:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flag = torch.zeros(1, device=device)
        for g in grads:  # no host sync per tensor: the flag stays on the device
            flag = torch.maximum(flag, has_inf_or_nan(g).float().reshape(1).to(device))
        return flag

    def set_learning_rate(self, lr: float) -> None:
        for group in self._ds.optimizer.param_groups:
            group["lr"] = lr

    def learning_rate(self) -> float:
        return self._ds.optimizer.param_groups[0]["lr"]

    def optimizer_step_count(self) -> int:
        """The Adam step of the first parameter that has state (0 before the first step)."""
        for state in self._inner_optimizer().state.values():
            if "step" in state:
                step = state["step"]
                return int(step.item() if torch.is_tensor(step) else step)
        return 0

    def grad_norm(self) -> float:
        return float(self._ds.get_global_grad_norm())

    def zero_stage(self) -> int:
        return int(self._ds.zero_optimization_stage())

    # ------------------------------------------------------------------ parameters
    def full_fp32_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        return zp.full_fp32_param(p)

    def set_full_param(self, p: torch.nn.Parameter, full: torch.Tensor) -> None:
        zp.set_full_param(p, full)

    def is_partitioned(self, p: torch.nn.Parameter) -> bool:
        return zp.is_zero3_param(p)

    def local_partition(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.ds_tensor.data

    def local_part_of(self, full: torch.Tensor, p: torch.nn.Parameter, fill: float = 0.0) -> torch.Tensor:
        return zp.zero3_local_part(full, p, fill)

    def gathered(self, params: Optional[list] = None):
        if self.zero_stage() != 3:
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()) if params is None else list(params))

    # ------------------------------------------------------------------ state
    def _has_adam_state(self) -> bool:
        """Whether the optimizer has taken a step, agreed by all ranks (the gathers are collective)."""
        return comm.all_true(any("exp_avg" in st for st in self._inner_optimizer().state.values()))

    def iter_full_state(self, with_moments: bool = True) -> Iterator[tuple[str, Mapping[str, torch.Tensor]]]:
        """(param name, {"param": fp32 master, "exp_avg": .., "exp_avg_sq": ..}) in full, one
        parameter at a time, in the module's order. Each value is gathered when it is read (a
        compaction holds one full tensor at a time, not three).

        Collective under ZeRO: every data-parallel rank must consume it to the end, reading the
        values in the same order. Moments are absent before the first optimizer step (or with
        ``with_moments=False``).
        """
        with_moments = self._has_adam_state() and with_moments
        opt = self._ds.optimizer
        if with_moments and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 link each parameter to its Adam state once, right after the first group's
            # step, when later groups have no state yet; relink now that every group has it.
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

        def full_value(p, key):
            if key == "param":
                return zp.full_fp32_param(p).clone()
            value = safe_get_full_optimizer_state(p, key)
            if value is None:  # no ZeRO: plain torch optimizer state
                value = opt.state[p][key]
            return value.float().clone()

        keys = ("param", *OPTIMIZER_STATE_KEYS) if with_moments else ("param",)
        for name, p in self.module.named_parameters():
            yield name, _GatheredOnRead(keys, functools.partial(full_value, p))

    def gather_full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """``iter_full_state`` as one dict (the whole model's state: for checks, not for rebuilds)."""
        return {name: dict(entry.items()) for name, entry in self.iter_full_state()}

    def _create_empty_adam_state(self, step: int) -> None:
        """Give a fresh engine zeroed Adam state so that it can be overwritten.

        DeepSpeed creates optimizer state lazily at the first step; ``safe_set_full_optimizer_state``
        fails before that. The flat fp32 partitions differ by stage.
        """
        opt = self._ds.optimizer
        inner = self._inner_optimizer()
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            flats = list(opt.fp32_partitioned_groups_flat)
        elif hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            flats = list(opt.single_partition_of_fp32_groups)
        else:
            flats = [p for g in inner.param_groups for p in g["params"]]
        for flat in flats:
            inner.state[flat] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _load_held(self, held: list, has_moments: bool, step: int) -> None:
        """Write the state ``rebuild`` kept into this freshly built engine: for each parameter
        (same order on every rank), its holder broadcasts it over the data-parallel group and
        every rank writes its copies (collective)."""
        if has_moments:
            self._create_empty_adam_state(step)
        params = dict(self.module.named_parameters())
        if set(params) != {name for name, _, _ in held}:
            missing = sorted(set(params) - {name for name, _, _ in held})
            raise KeyError(f"no carried state for parameters {missing[:3]}")
        for name, holder, entry in held:
            p = params[name]
            shape = tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
            for key in ("param", *(OPTIMIZER_STATE_KEYS if has_moments else ())):
                if entry is not None:
                    buf = entry.pop(key)
                    if tuple(buf.shape) != shape:
                        raise ValueError(f"carried state for {name} has shape {tuple(buf.shape)}, not {shape}")
                else:
                    buf = torch.empty(shape, dtype=torch.float32)
                comm.broadcast_(buf, comm.global_rank_in("dp", holder), "dp")
                buf = buf.to(self.local_device(p))
                if key == "param":
                    zp.set_full_param(p, buf)
                elif zp.has_master(p):
                    zp.set_full_master(p, buf, key)
                else:
                    self._ds.optimizer.state[p][key].copy_(buf)
                del buf

    def load_carried(self, held: list, has_moments: bool, step: int) -> None:
        """Write full state into this freshly built engine: ``held`` is ``[(param name, holder's
        DP rank, {"param", "exp_avg", "exp_avg_sq": full host tensor} on the holder, else None)]``
        in the module's order on every rank (collective over DP)."""
        self._load_held(held, has_moments, step)

    def local_device(self, p: torch.nn.Parameter) -> torch.device:
        return self.local_partition(p).device if self.is_partitioned(p) else p.device

    def rebuild(self, build_model: Callable[[], torch.nn.Module],
                slice_state: Callable[[Iterator], Iterator], *,
                carry_optimizer_state: bool = True,
                after_destroy: Callable[[], None] = lambda: None) -> "DeepSpeedEngine":
        """An engine over ``build_model()`` (the pruned shapes), carrying state; this one is
        destroyed (and its memory released) before the new model is built.

        ``slice_state`` maps this engine's ``iter_full_state`` pairs to the same pairs for the new
        model's parameter names and shapes, lazily (one parameter's state in flight at a time).
        Each sliced parameter is kept, on the host, by one data-parallel rank. With
        ``carry_optimizer_state=False`` the new engine starts with a fresh optimizer (the choice of
        Adapt-Pruner and Minitron, kept for comparison), but the weights still carry over.
        """
        step = self.optimizer_step_count() if carry_optimizer_state else 0
        has_moments = carry_optimizer_state and self._has_adam_state()
        lr = self.learning_rate()
        dp_rank, dp = comm.rank("dp"), comm.size("dp")
        held = []  # (new name, holder's dp rank, {key: host tensor} on the holder, else None)
        for i, (name, entry) in enumerate(slice_state(self.iter_full_state(with_moments=has_moments))):
            holder = i % dp
            values = {k: v.cpu() for k, v in entry.items()}  # every rank reads: a read may be collective
            held.append((name, holder, values if holder == dp_rank else None))
            del entry, values
        self.destroy()
        after_destroy()
        new_engine = DeepSpeedEngine(build_model(), self.options)
        new_engine._load_held(held, has_moments, step)
        new_engine.set_learning_rate(lr)
        return new_engine

    def save(self, folder: str) -> list[str]:
        writer = self._ds.checkpoint_engine
        writer.written = []
        self._ds.save_checkpoint(folder, tag=CHECKPOINT_TAG, save_latest=False)
        return list(writer.written)

    def after_failed_save(self) -> None:
        comm.barrier()  # the closing barrier of DeepSpeed's save, which the failed call skipped

    def load(self, folder: str) -> bool:
        check_engine_files(os.path.join(folder, CHECKPOINT_TAG))
        path, _ = self._ds.load_checkpoint(folder, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        return path is not None

    def destroy(self) -> None:
        """Drop the DeepSpeed engine (model, optimizer, buffers) and return its memory; this
        object is unusable afterwards."""
        module = self._ds.module
        self._ds.destroy()
        _forget_zero3_module(module)
        self._ds = module = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
