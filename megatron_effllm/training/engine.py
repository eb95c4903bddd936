"""The DeepSpeed engine around the model, and its rebuild after a structured prune.

A prune changes parameter shapes, which ZeRO's flat partitions cannot follow in place. So the
engine is rebuilt: every surviving parameter's fp32 master and Adam moments are gathered in full
(collectively, on every data-parallel rank), sliced with the same kept indices as the weight,
and written into the new engine's partitions; the step count is kept. The slicing itself is a
function supplied by the caller (the pruning adapter): this module knows nothing of pruning.
Under tensor parallelism "full" means full over the data-parallel group: each TP rank gathers
and sets its own shards, and the caller's function re-shards between them.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _skip_cpu_shm_build() -> None:
    """On CPU, DeepSpeed compiles a shared-memory all-reduce op at init (about a minute).

    gloo does the same job, so the build is skipped. Nothing changes on CUDA.
    """
    if torch.cuda.is_available():
        return
    import importlib

    # importlib, not `import deepspeed.comm.torch`: the package re-exports the name `torch`.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def deepspeed_config(*, micro_batch: int, grad_accum: int, zero_stage: int, bf16: bool,
                     clip_grad: float) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bool(bf16)},
        "gradient_clipping": clip_grad if clip_grad > 0 else 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if zero_stage == 3:
        # Keep whole parameters resident: the models this runs are pruned to fit anyway, and
        # prefetch thresholds tuned for GPUs only add latency here.
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0)
    return cfg


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas, eps):
    """AdamW with no weight decay on norms and biases (1-D parameters), as is standard."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # A client torch AdamW: DeepSpeed's own "AdamW" would JIT-compile a CPU kernel on CPU.
    # foreach: one fused pass over all tensors (the default on CUDA, not on CPU).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps,
                             foreach=True)


def initialize_engine(model, ds_config: dict, optimizer, mpu=None):
    import deepspeed

    _skip_cpu_shm_build()
    # A single process started without a launcher: DeepSpeed insists on the launcher's variable.
    os.environ.setdefault("LOCAL_RANK", "0")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, mpu=mpu,
        model_parameters=None,
    )
    return engine


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def optimizer_step_count(engine) -> int:
    """The Adam step of the first parameter that has state (0 before the first step)."""
    from deepspeed.utils import safe_get_full_optimizer_state  # noqa: F401

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        if "step" in state:
            step = state["step"]
            return int(step.item() if torch.is_tensor(step) else step)
    return 0


def _has_adam_state(engine) -> bool:
    """Whether the optimizer has taken a step, agreed by all ranks (the gathers are collective)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    local = any("exp_avg" in st for st in inner.state.values())
    flag = torch.tensor([1.0 if local else 0.0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def gather_full_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """{param name: {"param": fp32 master, "exp_avg": .., "exp_avg_sq": ..}} in full.

    Collective under ZeRO: every data-parallel rank must call it. Moments are absent before
    the first optimizer step.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    with_moments = _has_adam_state(engine)
    opt = engine.optimizer
    if with_moments and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter to its Adam state once, right after the first group's
        # step, when later groups have no state yet; relink now that every group has it.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        entry = {"param": (master if master is not None else p.detach()).float().clone()}
        if with_moments:
            for key in OPTIMIZER_STATE_KEYS:
                value = safe_get_full_optimizer_state(p, key)
                if value is None:  # no ZeRO: plain torch optimizer state
                    value = engine.optimizer.state[p][key]
                entry[key] = value.float().clone()
        out[name] = entry
    return out


def _create_empty_adam_state(engine, step: int) -> None:
    """Give a fresh engine zeroed Adam state so that it can be overwritten.

    DeepSpeed creates optimizer state lazily at the first step; ``safe_set_full_optimizer_state``
    fails before that. The flat fp32 partitions differ by stage.
    """
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
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


def load_full_state(engine, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    """Write full fp32 masters and Adam moments into a freshly built engine (collective)."""
    has_moments = any("exp_avg" in e for e in state.values())
    if has_moments:
        _create_empty_adam_state(engine, step)
    for name, p in engine.module.named_parameters():
        entry = state.get(name)
        if entry is None:
            raise KeyError(f"no carried state for parameter {name}")
        if tuple(entry["param"].shape) != tuple(p.ds_shape if hasattr(p, "ds_shape") else p.shape):
            raise ValueError(f"carried state for {name} has shape {tuple(entry['param'].shape)}")
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            set_full_master(p, entry["param"])
        else:
            with torch.no_grad():
                p.copy_(entry["param"].to(p.dtype))
        if has_moments:
            for key in OPTIMIZER_STATE_KEYS:
                if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                    set_full_master(p, entry[key], key)
                else:
                    engine.optimizer.state[p][key].copy_(entry[key])


def set_full_master(p: torch.nn.Parameter, full: torch.Tensor, optim_state_key: Optional[str] = None) -> None:
    """Set ``p``'s fp32 master (or Adam moment ``optim_state_key``) from its full value.

    Under ZeRO-3 through this rank's partition: DeepSpeed's ``safe_set_full_*`` cuts the full
    tensor without the padding of the last partition, so it fails for any size the
    data-parallel size does not divide (a pruned width, e.g. 39 channels on 2 ranks)."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    if is_zero3_param(p):
        local = zero3_local_part(full.float(), p)
        if optim_state_key is None:
            safe_set_local_fp32_param(p, local)
        else:
            safe_set_local_optimizer_state(p, local, optim_state_key)
    elif optim_state_key is None:
        safe_set_full_fp32_param(p, full)
    else:
        safe_set_full_optimizer_state(p, full, optim_state_key)


def rebuild_engine(
    engine,
    new_model: torch.nn.Module,
    slice_state: Callable[[dict], dict],
    *,
    ds_config: dict,
    make_opt: Callable[[torch.nn.Module], torch.optim.Optimizer],
    mpu=None,
    carry_optimizer_state: bool = True,
):
    """Replace ``engine`` by one over ``new_model`` (the pruned shapes), carrying state.

    ``slice_state`` maps the full state of the old engine ({name: {"param", "exp_avg",
    "exp_avg_sq"}}) to the same for the new model's parameter names and shapes. With
    ``carry_optimizer_state=False`` the new engine starts with a fresh optimizer (the choice of
    Adapt-Pruner and Minitron, kept for comparison), but the weights still carry over.
    """
    step = optimizer_step_count(engine)
    full = gather_full_state(engine)
    new_state = slice_state(full)
    del full
    lr = engine.optimizer.param_groups[0]["lr"]
    engine.destroy()
    if not carry_optimizer_state:
        new_state = {k: {"param": v["param"]} for k, v in new_state.items()}
        step = 0
    with torch.no_grad():
        for name, p in new_model.named_parameters():
            p.copy_(new_state[name]["param"].to(p.dtype))
    new_engine = initialize_engine(new_model, ds_config, make_opt(new_model), mpu=mpu)
    load_full_state(new_engine, new_state, step)
    set_learning_rate(new_engine, lr)
    return new_engine


# ---------------------------------------------------------------------- ZeRO-3 partitions
def is_zero3_param(p: torch.nn.Parameter) -> bool:
    """Whether ``p`` is partitioned by ZeRO-3 (its data lives in ``p.ds_tensor`` between uses)."""
    return hasattr(p, "ds_tensor")


def zero3_local_part(full: torch.Tensor, p: torch.nn.Parameter, fill: float = 0.0) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``full`` (shaped like ``p``): ZeRO-3 flattens a parameter,
    pads it to a multiple of the data-parallel size and gives rank r elements
    [r * n, (r + 1) * n), n = ``p.ds_tensor.numel()``; the padding gets ``fill``."""
    n = p.ds_tensor.numel()
    start = torch.distributed.get_rank(group=p.ds_process_group) * n if torch.distributed.is_initialized() else 0
    flat = full.reshape(-1)
    out = torch.full((n,), fill, dtype=full.dtype, device=full.device)
    piece = flat[start:start + n]
    out[:piece.numel()] = piece
    return out


def set_zero3_module_param(p: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Write ``full`` into this rank's partition of the module's (low-precision) copy of ``p``,
    which the next forward gathers; the fp32 master is set separately."""
    p.ds_tensor.data.copy_(zero3_local_part(full.to(p.ds_tensor.dtype), p))
