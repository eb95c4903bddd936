"""The ``TrainEngine`` over DeepSpeed ZeRO (stages 0-3), and its rebuild after a structured prune.

The only module of the package that imports ``deepspeed`` (with its helpers ``_zero_params``
and ``deepspeed_mpu``).

A prune changes parameter shapes, which ZeRO's flat partitions cannot follow in place. So the
engine is rebuilt: every surviving parameter's fp32 master and Adam moments are gathered in full
(collectively, on every data-parallel rank), sliced with the same kept indices as the weight,
and written into the new engine's partitions; the step count is kept. The slicing itself is a
function supplied by the caller (the pruning runtime): this module knows nothing of pruning.
Under tensor parallelism "full" means full over the data-parallel group: each TP rank gathers
and sets its own shards, and the caller's function re-shards between them.

Checkpoints: DeepSpeed's own checkpoint engine would unpickle its files with no restriction and
write tensors where they live. ``RestrictedCheckpointEngine`` writes CPU copies and reads
through torch's restricted unpickler with the few DeepSpeed classes the files hold
(``DEEPSPEED_GLOBALS``); ``load`` checks every file on some rank before any rank reads one.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
from typing import Callable, Optional

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.utils import has_inf_or_nan
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import safe_get_full_optimizer_state
from deepspeed.utils.tensor_fragment import fragment_address
from megatron.core import parallel_state

from megatron_effllm.engine import _zero_params as zp
from megatron_effllm.engine.base import EngineOptions
from megatron_effllm.engine.deepspeed_mpu import MegatronMPU
from megatron_effllm.errors import UserError
from megatron_effllm.parallel import comm
from megatron_effllm.safe_pickle import check_torch_file, load_torch

OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq")
CHECKPOINT_TAG = "ds"  # the sub-folder of a checkpoint DeepSpeed writes into
# What DeepSpeed 0.19's files name beyond tensors and containers (read from checkpoints saved at
# ZeRO 0-3, fp32 and bf16): the loss scaler, the ZeRO stage, a parameter's place in a flat
# partition. Rebuilding them runs no code of the file.
DEEPSPEED_GLOBALS = (LossScaler, ZeroStageEnum, fragment_address)


def _on_cpu(obj):
    """``obj`` with every tensor in its nested dicts, lists and tuples on the CPU."""
    if torch.is_tensor(obj):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same kind of mapping (an OrderedDict stays one)
        for key, value in obj.items():
            out[key] = _on_cpu(value)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


class RestrictedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, writing CPU copies (a checkpoint loads on any device)
    and reading only tensors, containers and ``DEEPSPEED_GLOBALS`` (UserError naming the file)."""

    def save(self, state_dict, path: str):
        super().save(_on_cpu(state_dict), path)

    def load(self, path: str, map_location=None):
        return load_torch(path, DEEPSPEED_GLOBALS)


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
    # foreach: one fused pass over all tensors (the default on CUDA, not on CPU).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=options.lr, betas=options.betas,
                             eps=options.eps, foreach=True)


def _initialize(model: torch.nn.Module, options: EngineOptions):
    _skip_cpu_shm_build()
    # A single process started without a launcher: DeepSpeed insists on the launcher's variable.
    os.environ.setdefault("LOCAL_RANK", "0")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # With megatron's groups, ZeRO partitions over its data-parallel group and clipping reduces
    # over its model-parallel group; without them every rank is data-parallel.
    mpu = MegatronMPU() if parallel_state.model_parallel_is_initialized() else None
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(model, options), config=deepspeed_config(options),
        mpu=mpu, model_parameters=None,
    )
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed chose the {type(engine.checkpoint_engine).__name__}; only its torch "
                           "checkpoint engine has a restricted replacement")
    engine.checkpoint_engine = RestrictedCheckpointEngine(engine._config)
    return engine


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

    def skip_step(self) -> None:
        """DeepSpeed's step at the accumulation boundary with the client optimizer's update turned
        off: gradients are cleared (and partitions handled) as after any step, parameters,
        Adam moments and the Adam step count stay."""
        inner = self._inner_optimizer()
        own = inner.__dict__.get("step")  # e.g. a scheduler's wrapper; put back afterwards
        inner.step = lambda *args, **kwargs: None
        try:
            self._ds.step()
        finally:
            if own is not None:
                inner.step = own
            else:
                del inner.step

    def grads_finite(self) -> bool:
        """Under ZeRO the optimizer checks its own reduced partitions and agrees over the data-
        and model-parallel groups (DeepSpeed's fp16 overflow check); otherwise the module's
        ``.grad`` tensors are checked and the flag is reduced over every rank."""
        opt = self._ds.optimizer
        if self.zero_stage() > 0 and hasattr(opt, "has_overflow"):
            return not opt.has_overflow(partition_gradients=getattr(opt, "partition_gradients", True))
        device = next(self.module.parameters()).device
        flag = torch.zeros(1, device=device)
        for p in self.module.parameters():
            if p.grad is not None:  # no host sync per tensor: the flag stays on the device
                flag = torch.maximum(flag, has_inf_or_nan(p.grad).float().reshape(1).to(device))
        comm.all_reduce_(flag, "world", "max")
        return not bool(flag.item())

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

    def gather_full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{param name: {"param": fp32 master, "exp_avg": .., "exp_avg_sq": ..}} in full.

        Collective under ZeRO: every data-parallel rank must call it. Moments are absent before
        the first optimizer step.
        """
        with_moments = self._has_adam_state()
        opt = self._ds.optimizer
        if with_moments and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 link each parameter to its Adam state once, right after the first group's
            # step, when later groups have no state yet; relink now that every group has it.
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
        out = {}
        for name, p in self.module.named_parameters():
            entry = {"param": zp.full_fp32_param(p).clone()}
            if with_moments:
                for key in OPTIMIZER_STATE_KEYS:
                    value = safe_get_full_optimizer_state(p, key)
                    if value is None:  # no ZeRO: plain torch optimizer state
                        value = opt.state[p][key]
                    entry[key] = value.float().clone()
            out[name] = entry
        return out

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

    def load_full_state(self, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        """Write full fp32 masters and Adam moments into this freshly built engine (collective)."""
        has_moments = any("exp_avg" in e for e in state.values())
        if has_moments:
            self._create_empty_adam_state(step)
        for name, p in self.module.named_parameters():
            entry = state.get(name)
            if entry is None:
                raise KeyError(f"no carried state for parameter {name}")
            if tuple(entry["param"].shape) != tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape):
                raise ValueError(f"carried state for {name} has shape {tuple(entry['param'].shape)}")
            if zp.has_master(p):
                zp.set_full_master(p, entry["param"])
            else:
                with torch.no_grad():
                    p.copy_(entry["param"].to(p.dtype))
            if has_moments:
                for key in OPTIMIZER_STATE_KEYS:
                    if zp.has_master(p):
                        zp.set_full_master(p, entry[key], key)
                    else:
                        self._ds.optimizer.state[p][key].copy_(entry[key])

    def rebuild(self, new_model: torch.nn.Module, slice_state: Callable[[dict], dict], *,
                carry_optimizer_state: bool = True,
                after_destroy: Callable[[], None] = lambda: None) -> "DeepSpeedEngine":
        """An engine over ``new_model`` (the pruned shapes), carrying state; this one is destroyed.

        ``slice_state`` maps the full state of this engine ({name: {"param", "exp_avg",
        "exp_avg_sq"}}) to the same for the new model's parameter names and shapes. With
        ``carry_optimizer_state=False`` the new engine starts with a fresh optimizer (the choice of
        Adapt-Pruner and Minitron, kept for comparison), but the weights still carry over.
        """
        step = self.optimizer_step_count()
        full = self.gather_full_state()
        new_state = slice_state(full)
        del full
        lr = self.learning_rate()
        self.destroy()
        after_destroy()
        if not carry_optimizer_state:
            new_state = {k: {"param": v["param"]} for k, v in new_state.items()}
            step = 0
        with torch.no_grad():
            for name, p in new_model.named_parameters():
                p.copy_(new_state[name]["param"].to(p.dtype))
        new_engine = DeepSpeedEngine(new_model, self.options)
        new_engine.load_full_state(new_state, step)
        new_engine.set_learning_rate(lr)
        return new_engine

    def save(self, folder: str) -> None:
        self._ds.save_checkpoint(folder, tag=CHECKPOINT_TAG, save_latest=False)

    def after_failed_save(self) -> None:
        comm.barrier()  # the closing barrier of DeepSpeed's save, which the failed call skipped

    def _check_files(self, folder: str) -> None:
        """Every file of DeepSpeed's sub-folder checked (split over the ranks, tensors unread)
        before any rank reads one; the first refusal is raised on every rank."""
        ds_dir = os.path.join(folder, CHECKPOINT_TAG)
        files = sorted(os.path.join(root, n) for root, _, names in os.walk(ds_dir) for n in names)
        error = None
        try:
            for path in files[comm.global_rank()::comm.world_size()]:
                check_torch_file(path, DEEPSPEED_GLOBALS)
        except UserError as err:
            error = str(err)
        error = next((e for e in comm.all_gather_object(error) if e), None)
        if error is not None:
            raise UserError(error)

    def load(self, folder: str) -> bool:
        self._check_files(folder)
        path, _ = self._ds.load_checkpoint(folder, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        return path is not None

    def destroy(self) -> None:
        self._ds.destroy()
