"""A bf16 run builds its model in bf16 (megatron's config carries the training dtype), its fp32
masters start from the source's own values, a compaction rebuilds in bf16 with the carried
masters exact, and the core attention's softmax runs in fp32 under bf16."""
import os

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
SHORT_BF16 = ["model.dtype=bf16", "train.steps=8", "train.checkpoint_interval=8", "train.log_interval=4",
              "train.eval_interval=100", "prune.start_step=2", "prune.end_step=6", "prune.compact_every=2",
              "export.hf=false"]


def _arch():
    from megatron_effllm.architecture import Architecture

    return Architecture.uniform(num_layers=2, hidden_size=64, num_heads=4, num_kv_groups=2,
                                ffn_hidden_size=128, vocab_size=256)


def test_builder_makes_every_parameter_bf16_and_megatron_knows_it():
    from megatron_effllm.model.builder import build_gpt_model
    from megatron_effllm.parallel.runtime import init_model_parallel

    init_model_parallel(tp=1, pp=1)
    model = build_gpt_model(_arch(), params_dtype=torch.bfloat16)
    wrong = {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.bfloat16}
    assert not wrong, wrong  # the norms too (megatron's local spec builds them in fp32)
    c = model.config
    assert c.bf16 and not c.fp16 and c.params_dtype == torch.bfloat16 and c.attention_softmax_in_fp32
    assert model.rotary_pos_emb.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32
    fp32 = build_gpt_model(_arch())
    assert {p.dtype for p in fp32.parameters()} == {torch.float32} and not fp32.config.bf16


def test_sdpa_softmax_is_fp32_under_bf16():
    """The bf16 core attention against an fp32 computation on the same (bf16-valued) inputs:
    within the rounding of its bf16 output, far below what a bf16 softmax loses."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_effllm.model.attention import SDPAttention
    from megatron_effllm.model.builder import make_transformer_config
    from megatron_effllm.parallel.runtime import init_model_parallel

    init_model_parallel(tp=1, pp=1)
    config = make_transformer_config(_arch(), params_dtype=torch.bfloat16).get_config_for_layer(1)
    attn = SDPAttention(config, 1, AttnMaskType.causal, "self")
    gen = torch.Generator().manual_seed(0)
    s, b, heads, groups, dim = 128, 2, 4, 2, 16
    # Large logits: a softmax in bf16 would lose several bits on them.
    q = (4 * torch.randn(s, b, heads, dim, generator=gen)).bfloat16()
    k = (4 * torch.randn(s, b, groups, dim, generator=gen)).bfloat16()
    v = torch.randn(s, b, groups, dim, generator=gen).bfloat16()
    out = attn(q, k, v, None)
    assert out.dtype == torch.bfloat16

    def reference(softmax_dtype):
        qq, kk, vv = (t.float().permute(1, 2, 0, 3) for t in (q, k, v))
        kk, vv = (t.repeat_interleave(heads // groups, dim=1) for t in (kk, vv))
        scores = (qq @ kk.transpose(-1, -2)) * attn.softmax_scale
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        probs = F.softmax(scores.to(softmax_dtype), dim=-1).float()
        return (probs @ vv).permute(2, 0, 1, 3).reshape(s, b, heads * dim)

    exact = reference(torch.float32)
    err = (out.float() - exact).abs().max().item()
    bf16_softmax_err = (reference(torch.bfloat16) - exact).abs().max().item()
    scale = exact.abs().max().item()
    print(f"SDPA bf16 vs fp32: {err:.2e}; a bf16 softmax: {bf16_softmax_err:.2e} (|out| <= {scale:.2f})")
    assert err <= 2 ** -8 * scale  # one bf16 rounding of the output
    assert err < bf16_softmax_err / 2


def _bf16_run(rank, world_size, run_dir, zero_stage):
    from megatron_effllm import layout
    from megatron_effllm.engine.deepspeed_engine import DeepSpeedEngine
    from megatron_effllm.model.weights import model_style
    from megatron_effllm.parallel import comm
    from megatron_effllm.training import trainer as trainer_mod
    from megatron_effllm.training.config import load_config

    seen = {"built": [], "source_masters": None, "compactions": []}
    build_engine = trainer_mod.build_engine

    def spy_build_engine(name, model, options):  # what the engine is handed
        seen["built"].append(({str(p.dtype) for p in model.parameters()}, model.config.bf16,
                              model.config.params_dtype, model.config.attention_softmax_in_fp32))
        return build_engine(name, model, options)

    load_masters = trainer_mod.load_canonical_masters

    def spy_load_masters(engine, arch, canonical):
        load_masters(engine, arch, canonical)
        local = layout.to_megatron(arch, canonical, comm.dims(), model_style(engine.module))
        exact = rounded = True
        for name, p in engine.module.named_parameters():
            exact &= torch.equal(engine.full_fp32_param(p), local[name].float())
            rounded &= torch.equal(local[name].bfloat16().float(), local[name].float())
        seen["source_masters"] = (exact, rounded)

    rebuild = DeepSpeedEngine.rebuild

    def spy_rebuild(self, build_model, slice_state, **kwargs):
        expected = {}

        def kept(pairs):  # every rank reads every value in the same order (reads are collective)
            for name, entry in slice_state(pairs):
                expected[name] = {k: v.clone() for k, v in entry.items()}
                yield name, expected[name]

        new = rebuild(self, build_model, kept, **kwargs)
        after = new.gather_full_state()
        dtypes = {str(p.dtype) for p in new.module.parameters()}
        same = all(torch.equal(after[n][k], expected[n][k]) for n in expected for k in expected[n])
        seen["compactions"].append((dtypes, new.module.config.bf16, sorted(expected[next(iter(expected))]), same))
        return new

    trainer_mod.build_engine = spy_build_engine
    trainer_mod.load_canonical_masters = spy_load_masters
    DeepSpeedEngine.rebuild = spy_rebuild
    summary = trainer_mod.run(load_config(TINY, SHORT_BF16 + [f"run_dir={run_dir}", f"parallel.zero_stage={zero_stage}"]))
    return seen, summary


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_run_builds_bf16_with_exact_masters_through_compaction(tmp_path, zero_stage):
    """A 2-rank bf16 run of the tiny config (masters partitioned; at ZeRO-3 the weights too): the
    model DeepSpeed receives is bf16 at the start and at every compaction; the masters start
    from the (fp32, random) source values exactly, and after each compaction equal the sliced
    masters and moments exactly."""
    results = run_ranks(_bf16_run, world_size=2, args=(str(tmp_path / "run"), zero_stage))
    for rank, (seen, summary) in enumerate(results):
        assert seen["built"] and all(b == ({"torch.bfloat16"}, True, torch.bfloat16, True) for b in seen["built"]), \
            (rank, seen["built"])
        exact, rounded = seen["source_masters"]
        assert exact and not rounded, rank  # the source has fp32 bits bf16 drops; the masters kept them
        assert seen["compactions"], rank
        for dtypes, bf16, keys, same in seen["compactions"]:
            assert dtypes == {"torch.bfloat16"} and bf16, (rank, dtypes)
            assert keys == ["exp_avg", "exp_avg_sq", "param"] and same, (rank, keys)
        assert summary["final_params"] < summary["source_params"]
