"""The dry-run capacity plan: per-rank parameter counts equal those of the megatron models each
rank builds (megatron-core's parallel state for sampled ranks of a 1,024-rank world on torch's
fake process group, models on the meta device), the shipped configs plan at the scale their
headers state, and a config that does not fit is refused in one line."""
import json
import random
import re

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch.testing._internal.distributed.fake_pg import FakeStore

from megatron_effllm.architecture import Architecture
from megatron_effllm.cli import plan as plan_cli
from megatron_effllm.model.builder import build_gpt_model
from megatron_effllm.parallel.runtime import ensure_cpu_support, init_model_parallel
from megatron_effllm.planning import make_plan
from megatron_effllm.planning.memory import layer_activation_bytes, state_bytes

CONFIGS = ("configs/tiny_cpu.yaml", "configs/smollm2_135m_cpu_demo.yaml",
           "configs/llama3_2_1b_to_0_5b.yaml", "configs/qwen2_5_1_5b_to_0_5b.yaml")
WORLD = 1024  # 128 nodes x 8
# (tp, pp) at 1,024 ranks: every config split by TP and/or PP (smollm2: 30 layers over 4 uneven stages)
SPLITS = {"configs/tiny_cpu.yaml": (2, 2), "configs/smollm2_135m_cpu_demo.yaml": (1, 4),
          "configs/llama3_2_1b_to_0_5b.yaml": (8, 2), "configs/qwen2_5_1_5b_to_0_5b.yaml": (2, 4)}


def header_scale(path: str) -> list[str]:
    with open(path) as f:
        found = re.search(r"^# scale: (.+)$", f.read(), re.MULTILINE)
    assert found, f"{path} has no '# scale: nodes=.. gpus_per_node=.. gpu_mem_gb=..' header line"
    return found.group(1).split()


def meta_params(arch, world: int, rank: int, tp: int, pp: int) -> int:
    """Parameters of the megatron model global rank ``rank`` builds, with megatron's own groups."""
    if dist.is_initialized():  # a one-process world an earlier test of this process left behind
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 create_gloo_process_groups=False)
        with torch.device("meta"):
            model = build_gpt_model(arch, init_weights=False, use_te=False)
        return sum(p.numel() for p in model.parameters())
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.parametrize("config", CONFIGS)
def test_plan_params_equal_meta_models_at_1024_ranks(config):
    ensure_cpu_support()
    tp, pp = SPLITS[config]
    probe = make_plan(config, nodes=1, gpus_per_node=tp * pp, gpu_mem_gb=1e6,
                      overrides=[f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.zero_stage=1"])
    dp = WORLD // (tp * pp)
    plan = make_plan(config, nodes=WORLD // 8, gpus_per_node=8, gpu_mem_gb=1e6,
                     overrides=[f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.zero_stage=1",
                                f"data.global_batch={probe.cfg.data.micro_batch * dp}"])
    assert (plan.layout.world, plan.layout.dp) == (WORLD, dp)
    ranks = [0, WORLD - 1] + random.Random(config).sample(range(1, WORLD - 1), 4)
    for rank in ranks:
        assert plan.params_of_rank(rank) == meta_params(plan.arch, WORLD, rank, tp, pp), (config, rank)
    # every parameter is on some shard; tied embeddings have a copy on the last stage, and every
    # TP rank holds the norms
    a = plan.arch
    copy = a.hidden_size * a.vocab_size if a.tie_word_embeddings else 0
    norms = a.hidden_size * (2 * a.num_layers + 1)
    assert sum(sh.params for sh, _ in plan.memory) == a.num_params() + copy + (tp - 1) * norms


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_plans_at_its_header_scale(config, capsys):
    scale = header_scale(config)
    plan_cli.main([config, *scale, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["refusal"] is None
    lay = out["layout"]
    assert lay["world"] == lay["dp"] * lay["tp"] * lay["pp"] == lay["nodes"] * lay["gpus_per_node"]
    assert out["deepspeed"]["zero_optimization"]["stage"] == lay["zero_stage"]
    assert out["deepspeed"]["gradient_accumulation_steps"] == lay["grad_accum"]
    assert f"--config {config}" in out["launch"]["deepspeed"] and "--module megatron_effllm.cli.train" in out["launch"]["deepspeed"]
    assert out["checkpoint"]["total_bytes"] >= out["checkpoint"]["largest_rank_bytes"] > 0


def test_zero_stages_split_the_state_over_data_parallel_ranks():
    psi, dp, largest = 1_000_000, 8, 50_000
    s0, s1, s2, s3 = (state_bytes(psi, 2, z, dp, largest) for z in range(4))
    assert s0["optimizer"] == 16 * psi and s2["optimizer"] == 16 * psi // dp  # fp32 master + grad + moments
    # bf16 ZeRO-1 is DeepSpeed's BF16_Optimizer: its fp32 gradient buffer is the whole model, and
    # each bf16 gradient is added into it and freed (one tensor's at a time), as at ZeRO-2
    assert s1["optimizer"] == 12 * psi // dp + 4 * psi
    assert s0["gradients"] == 2 * psi and s1["gradients"] == s2["gradients"] == 2 * largest
    assert s3["gradients"] == 2 * psi // dp
    assert s2["weights"] == 2 * psi and s3["weights"] == 2 * psi // dp
    f0, f1 = (state_bytes(psi, 4, z, dp, largest) for z in (0, 1))
    assert f0["optimizer"] == 8 * psi and f0["gradients"] == 4 * psi  # fp32 without ZeRO: no master
    assert f1["optimizer"] == 16 * psi // dp and f1["gradients"] == 4 * psi  # kept until the boundary


def _saved_bytes_per_token(arch, dtype, seq=32, batch=2):
    """Bytes autograd keeps for the backward of one forward with the loss (parameters excluded),
    each storage counted once, per token."""
    torch.manual_seed(0)
    model = build_gpt_model(arch, params_dtype=dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, arch.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(seq).expand(batch, seq), None, labels=tokens)
    return sum(saved.values()) / (seq * batch)


@pytest.mark.parametrize("dtype, b", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("h, heads, kv, f", [(64, 4, 2, 128), (128, 8, 2, 320)])
def test_modelled_activations_match_what_autograd_keeps_per_layer(dtype, b, h, heads, kv, f):
    """A layer's saved tensors (the difference between a 2- and a 1-layer model) within 5% of the
    model: the formula's rounding of per-head sizes, not a missing tensor."""
    init_model_parallel(tp=1, pp=1)
    archs = [Architecture.uniform(num_layers=n, hidden_size=h, num_heads=heads, num_kv_groups=kv,
                                  ffn_hidden_size=f, vocab_size=256) for n in (1, 2)]
    measured = _saved_bytes_per_token(archs[1], dtype) - _saved_bytes_per_token(archs[0], dtype)
    assert layer_activation_bytes(archs[1], 1, 1, b, 1) == pytest.approx(measured, rel=0.05)


def test_activations_and_logits_per_token_of_the_local_layer_spec():
    """The per-layer count measured with saved_tensors_hooks on built layers (the module doc)."""
    arch = Architecture.uniform(num_layers=1, hidden_size=64, num_heads=4, num_kv_groups=2,
                                ffn_hidden_size=128, vocab_size=256)
    fp32 = 4 * (6 * 64 + 3 * 64 + 3 * 32 + 5 * 128) + 4 * 4
    assert layer_activation_bytes(arch, 0, 10, 4, 1) == 10 * fp32
    assert layer_activation_bytes(arch, 0, 10, 2, 1) == 10 * (fp32 // 2 + 8 + 2 * 4 * 64)
    (_, mem), = make_plan("configs/tiny_cpu.yaml", 1, 2, 16).memory
    assert mem.terms["logits"] == 64 * 4 * 49152 * 4  # fp32: the loss upcasts in place
    (_, mem), = make_plan("configs/tiny_cpu.yaml", 1, 2, 16, ["model.dtype=bf16"]).memory
    assert mem.terms["logits"] == 64 * 4 * 49152 * (2 + 4)


def test_a_config_that_does_not_fit_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        plan_cli.main(["configs/qwen2_5_1_5b_to_0_5b.yaml", "nodes=2", "gpus_per_node=8", "gpu_mem_gb=16",
                       "data.micro_batch=8", "data.global_batch=512"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: does not fit:")
    assert "the largest term is activations" in err[0] and "activation recompute" in err[0]


@pytest.mark.parametrize("items, message", [
    (["nodes=2", "gpus_per_node=8"], "needs gpu_mem_gb=..."),
    (["nodes=3", "gpus_per_node=1", "gpu_mem_gb=80"], "not divisible by parallel.tp x parallel.pp"),
    (["nodes=two", "gpus_per_node=8", "gpu_mem_gb=80"], "nodes='two' must be a number"),
])
def test_bad_scale_is_one_error_line(items, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        plan_cli.main(["configs/qwen2_5_1_5b_to_0_5b.yaml", *items])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err



def test_distillation_plans_the_teacher_beside_the_student():
    from megatron_effllm.planning.plan import make_plan

    (sh, mem), = make_plan("configs/tiny_cpu.yaml", 1, 2, 16).memory
    (_, kd), = make_plan("configs/tiny_cpu.yaml", 1, 2, 16, ["distill.alpha=0.5"]).memory
    assert mem.terms["teacher"] == 0
    # the teacher's weights in the training dtype (fp32 here) and its fp32 logits (last stage)
    assert kd.terms["teacher"] == sh.params * 4 + 4 * 64 * 49152 * 4
    assert kd.step_peak == mem.step_peak + kd.terms["teacher"]


def test_checkpoint_bytes_count_each_ranks_shard_and_the_inverses_once_per_shard():
    """Qwen recipe at its scale (DP 8 x TP 2): every rank writes its own Hessians and its TP
    slice of the saliency vectors (less than the whole vectors it holds in memory); the fp64
    H^-1 is written by DP rank 0 of each TP shard only; the total is the sum over all ranks."""
    plan = make_plan("configs/qwen2_5_1_5b_to_0_5b.yaml", 2, 8, 80)
    lay, (_, mem) = plan.layout, plan.memory[0]
    rows = dict(plan.checkpoint["per_rank"])
    for rank, files in rows.items():
        dims = lay.dims_of(rank)
        assert (files["pruning_dp_shared"] == 2 * mem.terms["hessians"] > 0) == (dims.dp_rank == 0), rank
        assert mem.terms["hessians"] < files["pruning_rank"] < mem.terms["hessians"] + mem.terms["saliency"]
    world = [rows[0] if lay.dims_of(r).dp_rank == 0 else rows[lay.tp] for r in range(0, lay.world, lay.tp)]
    assert plan.checkpoint["total"] == lay.tp * sum(sum(f.values()) for f in world)
