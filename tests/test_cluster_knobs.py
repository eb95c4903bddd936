"""The cluster precision and speed settings: fp32 gradient accumulation, ZeRO overlap_comm,
activation recompute (with the pruning statistics counted once), CUDA_DEVICE_MAX_CONNECTIONS,
and the one-line refusals of combinations that cannot work."""
import os

import pytest
import torch

from dist_utils import run_ranks
from megatron_effllm.architecture import Architecture
from megatron_effllm.engine.base import EngineOptions
from megatron_effllm.engine.deepspeed_engine import deepspeed_config
from megatron_effllm.errors import UserError
from megatron_effllm.model.builder import Recompute, build_gpt_model
from megatron_effllm.parallel import runtime
from megatron_effllm.parallel.runtime import init_model_parallel, limit_cuda_connections
from megatron_effllm.training.config import load_config
from megatron_effllm.training.runtime.factory import make_runtime

TINY = "configs/tiny_cpu.yaml"


# ------------------------------------------------------------------ configuration
def test_defaults_and_refusals():
    cfg = load_config(TINY)
    assert cfg.model.fp32_grad_accum and cfg.parallel.overlap_comm
    assert (cfg.model.recompute, cfg.parallel.sequence_parallel) == ("none", False)
    refused = {
        ("parallel.sequence_parallel=true",): "parallel.sequence_parallel: true needs parallel.tp >= 2",
        ("model.dtype=bf16", "parallel.zero_stage=0"): "needs parallel.zero_stage 1, 2 or 3",
        ("model.recompute=full", "parallel.pp=2"): "model.recompute: full with parallel.pp=2",
        ("model.recompute=full", "prune.strategy=sheared"): "model.recompute: full with prune.strategy sheared",
        ("model.recompute=everything",): "is not one of none, selective, full",
        ("model.recompute_method=random",): "is not one of uniform, block",
        ("model.recompute_num_layers=0",): "model.recompute_num_layers must be >= 1",
    }
    for overrides, message in refused.items():
        with pytest.raises(UserError, match=message) as err:
            load_config(TINY, list(overrides))
        assert "\n" not in str(err.value)
    # without ZeRO, bf16 trains when its accumulation stays bf16
    load_config(TINY, ["model.dtype=bf16", "parallel.zero_stage=0", "model.fp32_grad_accum=false"])


def test_deepspeed_config_maps_the_knobs(monkeypatch):
    base = {"micro_batch": 2, "grad_accum": 4, "zero_stage": 2}
    fp32 = deepspeed_config(EngineOptions(**base, bf16=True, fp32_grad_accum=True))
    assert fp32["data_types"] == {"grad_accum_dtype": "fp32"} and fp32["communication_data_type"] == "fp32"
    for options in (EngineOptions(**base, bf16=True, fp32_grad_accum=False),
                    EngineOptions(**base, bf16=False, fp32_grad_accum=True)):
        assert not {"data_types", "communication_data_type"} & set(deepspeed_config(options))
    # overlap_comm goes to DeepSpeed on CUDA; on the CPU (no streams) DeepSpeed's default stays
    on = EngineOptions(**base, overlap_comm=True)
    assert "overlap_comm" not in deepspeed_config(on)["zero_optimization"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert deepspeed_config(on)["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(EngineOptions(**base, overlap_comm=False))["zero_optimization"]["overlap_comm"] is False
    assert "overlap_comm" not in deepspeed_config(EngineOptions(**base))["zero_optimization"]


def test_cuda_connections_only_with_tensor_parallelism_on_cuda(monkeypatch):
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    limit_cuda_connections(tp=2)  # this machine: no CUDA, nothing to set
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    limit_cuda_connections(tp=1)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    limit_cuda_connections(tp=1, sequence_parallel=True)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    # init_model_parallel sets it before it starts the process group
    seen = []
    monkeypatch.setattr(runtime, "_ensure_process_group",
                        lambda timeout_s=None: seen.append(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")))
    monkeypatch.setattr(runtime.dist, "get_world_size", lambda: 3)  # then stops: 3 % (2 * 1)
    with pytest.raises(UserError):
        init_model_parallel(2, 1)
    assert seen == ["1"]
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")  # the user's own value is kept
    limit_cuda_connections(tp=2)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


# ------------------------------------------------------------------ fp32 accumulation
class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (self.w * x).sum()


def _accumulated_grad_norms(rank, world_size):
    """The gradient norm a step sees after micro-batch gradients 256, 1, 1, 1 (scaled by 1/4
    for the accumulation: 64, .25, .25, .25): summed in bf16, 64 + .25 rounds back to 64."""
    from megatron_effllm.engine import build_engine

    out = {}
    for stage in (1, 2, 3):
        for fp32 in (False, True):
            options = EngineOptions(micro_batch=1, grad_accum=4, zero_stage=stage, bf16=True,
                                    fp32_grad_accum=fp32, clip_grad=0.0, lr=0.0)
            engine = build_engine("deepspeed", _Scalar(), options)
            for k, x in enumerate((256.0, 1.0, 1.0, 1.0)):
                engine.backward(engine(torch.tensor([x], dtype=torch.bfloat16)), last_micro_batch=k == 3)
            assert float(engine.step_unless(torch.zeros(1))) == 0.0  # finite: the step is taken
            out[(stage, fp32)] = engine.grad_norm()
            engine.destroy()
    return out


def test_fp32_gradient_accumulation_keeps_small_micro_batch_gradients():
    norms = run_ranks(_accumulated_grad_norms, world_size=1)[0]
    for stage in (1, 2, 3):
        assert norms[(stage, True)] == 64.75, (stage, norms)
        assert norms[(stage, False)] == 64.0, (stage, norms)  # what bf16 accumulation loses


def _nonfinite_is_seen_in_fp32_sums(rank, world_size):
    from megatron_effllm.engine import build_engine

    options = EngineOptions(micro_batch=1, grad_accum=2, zero_stage=1, bf16=True, fp32_grad_accum=True)
    engine = build_engine("deepspeed", _Scalar(), options)
    seen = []
    for first in (float("inf"), 1.0):  # a non-finite first micro-batch, then a finite window
        for k, x in enumerate((first, 1.0)):
            engine.backward(engine(torch.tensor([x], dtype=torch.bfloat16)), last_micro_batch=k == 1)
        seen.append(float(engine.step_unless(torch.zeros(1))) == 0.0)  # skipped when not finite
    return type(engine._ds.optimizer).__name__, seen


def test_nonfinite_gradient_of_an_earlier_micro_batch_is_detected():
    # At ZeRO-1 DeepSpeed sums in its BF16 optimizer: the module's .grad holds the last micro-batch only.
    kind, seen = run_ranks(_nonfinite_is_seen_in_fp32_sums, world_size=1)[0]
    assert kind == "BF16_Optimizer"
    assert seen == [False, True]


# ------------------------------------------------------------------ activation recompute
class _Engine:
    """What the pruning runtime asks of an engine when it installs its hooks."""

    def __init__(self, module):
        self.module = module

    def is_partitioned(self, p):
        return False


def _one_step(recompute: Recompute):
    """Loss, gradients and the pruning statistics of one training micro-batch of a tiny model
    (strategy adapt: gradient saliency, OBS Hessians and block cosines, all hooked)."""
    arch = Architecture.uniform(num_layers=4, hidden_size=32, num_heads=4, num_kv_groups=2,
                                ffn_hidden_size=64, vocab_size=96)
    cfg = load_config(TINY, ["prune.strategy=adapt", "prune.start_step=0", "prune.obs_tokens_per_step=1000"])
    torch.manual_seed(0)
    model = build_gpt_model(arch, use_te=False, recompute=recompute).train()
    pruning = make_runtime(cfg, arch, arch.num_params())
    pruning.install(_Engine(model))
    pruning.start_step(True, samples_per_rank=2.0, grad_scale=1.0, step=0)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (2, 16), generator=g)
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).float().mean()
    loss.backward()
    pruning.end_micro_batch(2.0)
    pruning.end_step(torch.zeros(1))  # a counted step: its Hessian inputs join the sums now
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = {**pruning.stats.saliency.state, **pruning.stats.hessians.state, "layer_cos": pruning.stats.layer_cos}
    pruning.remove_hooks()
    return loss.detach(), grads, {k: v.clone() for k, v in stats.items()}


def test_recompute_gives_the_same_loss_gradients_and_statistics():
    init_model_parallel(1, 1)
    loss, grads, stats = _one_step(Recompute())
    assert any(k.startswith("xtx.") for k in stats) and float(stats["layer_cos"][:, 1].sum()) > 0
    for recompute in (Recompute("selective"), Recompute("full", "uniform", 1), Recompute("full", "uniform", 2),
                      Recompute("full", "block", 3)):
        r_loss, r_grads, r_stats = _one_step(recompute)
        # exact on the CPU: the recomputed forward repeats the same kernels on the same inputs
        assert torch.equal(r_loss, loss), recompute
        for name, grad in grads.items():
            assert torch.equal(r_grads[name], grad), (recompute, name)
        # the hooks that add statistics count the first forward only, not the recomputed one
        assert stats.keys() == r_stats.keys()
        for key, value in stats.items():
            assert torch.equal(r_stats[key], value), (recompute, key)


def test_recompute_chunks_fit_every_pipeline_stage():
    full = Recompute("full", "uniform", 4)
    assert full.megatron_fields([6, 6]) == {"recompute_granularity": "full", "recompute_method": "uniform",
                                            "recompute_num_layers": 3}
    assert full.megatron_fields([3, 2])["recompute_num_layers"] == 1
    assert Recompute("full", "block", 9).megatron_fields([4])["recompute_num_layers"] == 4
    assert Recompute("selective").megatron_fields([4]) == {"recompute_granularity": "selective"}
    assert Recompute().megatron_fields([4]) == {}
