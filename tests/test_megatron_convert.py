"""Canonical <-> megatron layout, megatron checkpoints (resharding), and the two converter CLIs.

Exact equality (torch.equal) everywhere the mapping is a pure permutation of values.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dist_utils import run_ranks
from megatron_fixtures import (
    ALL_MODELS,
    VOCAB,
    any_model,
    hf_logits,
    random_canonical,
    sample_ids,
    tiny_hf,
)
from megatron_effllm import layout as L
from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError

TO_MEGATRON = "megatron_effllm.cli.convert_megatron"
TO_HF = "megatron_effllm.cli.convert_hf"


def assert_same(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- pure layout
def one_layer(num_heads=4, num_kv_groups=2, ffn=4) -> Architecture:
    """hidden 1, head_dim 1: q/k/v and gate/up are column vectors labelled by their rows."""
    return Architecture.uniform(num_layers=1, hidden_size=1, num_heads=num_heads, num_kv_groups=num_kv_groups,
                                ffn_hidden_size=ffn, vocab_size=2, head_dim=1)


def test_qkv_interleaving_is_megatrons_per_group_order():
    # 4 query heads in 2 KV groups, head_dim 1: rows labelled by what they are.
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])  # heads 0,1 -> group 0; heads 2,3 -> group 1
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = L.fuse_qkv(q, k, v, 4, 2)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    # TP=2: each rank holds whole groups.
    assert L.qkv_to_megatron(q, k, v, 4, 2, L.ParallelDims(1, 2)).flatten().tolist() == [12, 13, 21, 31]
    shards = [L.qkv_to_megatron(q, k, v, 4, 2, L.ParallelDims(r, 2)) for r in range(2)]
    canon = L.canonical_from_shards(one_layer(), "decoder.layers.0.self_attention.linear_qkv.weight", shards)
    back = [canon[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert all(torch.equal(x, y) for x, y in zip(back, (q, k, v)))
    # Biases (1-D) take the same path.
    assert L.fuse_qkv(q[:, 0], k[:, 0], v[:, 0], 4, 2).tolist() == [10, 11, 20, 30, 12, 13, 21, 31]


def test_fc1_tp_shard_is_gate_part_then_up_part():
    gate = torch.arange(4.0).unsqueeze(1)
    up = 10 + torch.arange(4.0).unsqueeze(1)
    assert L.fc1_to_megatron(gate, up).flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    shards = [L.fc1_to_megatron(gate, up, L.ParallelDims(r, 2)) for r in range(2)]
    assert shards[1].flatten().tolist() == [2, 3, 12, 13]
    canon = L.canonical_from_shards(one_layer(), "decoder.layers.0.mlp.linear_fc1.weight", shards)
    g, u = canon["model.layers.0.mlp.gate_proj.weight"], canon["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_primitives_map_masks_and_moments_like_weights():
    """Any tensor shaped like a weight maps the same way: mapping commutes with elementwise
    products, so a 0/1 mask (bool too) or an Adam moment lands on the weight's entries."""
    g = torch.Generator().manual_seed(0)
    heads, kv, d, h = 6, 2, 4, 8
    w = [torch.randn(n * d, h, generator=g) for n in (heads, kv, kv)]
    m = [torch.rand(n * d, h, generator=g) > 0.5 for n in (heads, kv, kv)]
    for r in range(2):
        fused_w = L.qkv_to_megatron(*w, heads, kv, L.ParallelDims(r, 2))
        fused_m = L.qkv_to_megatron(*m, heads, kv, L.ParallelDims(r, 2))
        assert fused_m.dtype == torch.bool
        masked = L.qkv_to_megatron(*(a * b for a, b in zip(w, m)), heads, kv, L.ParallelDims(r, 2))
        assert torch.equal(masked, fused_w * fused_m)


def test_stage_layer_counts():
    assert L.stage_layer_counts(4, 2) == [2, 2]
    assert L.stage_layer_counts(3, 2) == [2, 1]
    assert L.stage_layer_counts(7, 3) == [3, 2, 2]
    assert list(L.stage_layers(7, 3, 1)) == [3, 4]
    with pytest.raises(UserError, match="pipeline"):
        L.stage_layer_counts(1, 2)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_layout_round_trip_every_layout_is_exact(name):
    _, arch, sd = any_model(name)
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        for style in (L.LOCAL, L.TE):
            shards = L.all_shards(arch, sd, tp, pp, style)
            if tp == 1 and pp == 1:
                assert L.detect_style(shards[(0, 0)]) == style
            # _extra_state entries, as a model's state_dict has them, are ignored on read.
            shards[(0, 0)]["decoder.layers.0.mlp.linear_fc1._extra_state"] = None
            assert_same(L.from_megatron(arch, shards, tp, pp), sd)


def test_megatron_shapes_are_the_shards_shapes():
    """The data-free shapes (the kinds' math on meta tensors) equal every real shard's."""
    for name in ("llama", "qwen2"):
        _, arch, sd = tiny_hf(name)
        for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
            for (t, p), shard in L.all_shards(arch, sd, tp, pp, L.TE).items():
                want = {k: tuple(v.shape) for k, v in shard.items()}
                assert L.megatron_shapes(arch, L.ParallelDims(t, tp, p, pp), L.TE) == want, (name, t, p)


def test_layout_rejects_bad_input():
    _, arch, sd = tiny_hf("llama")
    with pytest.raises(UserError, match="missing"):
        L.to_megatron(arch, {k: v for k, v in sd.items() if k != "lm_head.weight"})
    bad = dict(sd)
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"][:-1]
    with pytest.raises(UserError, match="up_proj"):
        L.to_megatron(arch, bad)
    with pytest.raises(UserError, match="tensor parallel size 3"):
        L.to_megatron(arch, sd, L.ParallelDims(0, 3))
    odd_vocab = arch.replace(vocab_size=VOCAB - 1)
    with pytest.raises(UserError, match="vocab size 127"):
        L.to_megatron(odd_vocab, random_canonical(odd_vocab), L.ParallelDims(0, 2))
    shards = L.all_shards(arch, sd, 2, 1)
    del shards[(1, 0)]
    with pytest.raises(UserError, match="tp=1 pp=0 is missing"):
        L.from_megatron(arch, shards, 2, 1)


# ----------------------------------------------------------------------------- checkpoints
def _reshard_body(rank, world_size, root):
    """Load canonical weights at TP=2, gather them back, save a checkpoint at TP=2; reload
    it at PP=2 (TP=1), gather again; compare logits with HF at PP=2."""
    from megatron_effllm.convert.megatron_checkpoint import load_megatron_model, save_megatron_checkpoint
    from megatron_effllm.model import build_gpt_model, forward_logits, gather_canonical, load_canonical
    from megatron_effllm.parallel.runtime import init_model_parallel

    out = {}
    names = ["llama", "qwen2", "nonuniform-llama"]
    for name in names:
        _, arch, sd = any_model(name)
        init_model_parallel(tp=2, pp=1)
        model = build_gpt_model(arch)
        load_canonical(model, arch, sd)
        back = gather_canonical(model, arch)
        out[(name, "tp2 gather")] = all(torch.equal(back[k], sd[k]) for k in sd) and set(back) == set(sd)
        save_megatron_checkpoint(model, arch, os.path.join(root, name))
    for name in names:
        hf, arch, sd = any_model(name)
        ck_arch, model = load_megatron_model(os.path.join(root, name), tp=1, pp=2)
        back = gather_canonical(model, arch)
        out[(name, "arch")] = ck_arch == arch
        out[(name, "pp2 load")] = all(torch.equal(back[k], sd[k]) for k in sd) and set(back) == set(sd)
        ids = sample_ids()
        out[(name, "pp2 logit diff")] = (forward_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    return out


def test_checkpoint_saved_at_tp2_loads_at_pp2_and_tp1(tmp_path):
    from megatron_effllm.convert.megatron_checkpoint import load_canonical_checkpoint, read_checkpoint_info

    results = run_ranks(_reshard_body, world_size=2, args=(str(tmp_path),))
    for rank, res in enumerate(results):
        for key, value in res.items():
            if key[1] == "pp2 logit diff":
                print(f"{key[0]} checkpoint TP=2 -> PP=2 rank {rank} max abs logit diff {value:.2e}")
                assert value <= 1e-4, (rank, key, value)
            else:
                assert value is True, (rank, key)
    _, manifest = read_checkpoint_info(str(tmp_path / "qwen2"))
    assert (manifest["tensor_parallel"], manifest["pipeline_parallel"]) == (2, 1)
    # And read back here, in one process at TP=1/PP=1.
    for name in ["llama", "qwen2", "nonuniform-llama"]:
        _, arch, sd = any_model(name)
        ck_arch, back, tok = load_canonical_checkpoint(str(tmp_path / name))
        assert ck_arch == arch and tok is None
        assert_same(back, sd)


def test_checkpoint_verification_names_the_bad_file(tmp_path):
    from megatron_effllm.convert import megatron_checkpoint as C
    from megatron_effllm.manifest import write_manifest

    _, arch, sd = tiny_hf("qwen2")
    ck = str(tmp_path / "ck")
    C.save_canonical_checkpoint(arch, sd, ck, tp=2, pp=1)
    C.verify_checkpoint(ck)
    with pytest.raises(UserError, match="already exists"):
        C.save_canonical_checkpoint(arch, sd, ck)
    assert [p for p in os.listdir(tmp_path) if "partial" in p] == []

    # A narrower layer in architecture.json than in the weights.
    wrong = str(tmp_path / "wrong")
    os.system(f"cp -r {ck} {wrong}")
    bad_arch = arch.with_layers(
        [arch.layers[0].__class__(4, 2, 32, 0)] + list(arch.layers[1:])
    )
    bad_arch.save(os.path.join(wrong, C.ARCH_FILE))
    write_manifest(wrong)  # consistent checksums: the structural check must still catch it
    with pytest.raises(UserError, match=r"linear_fc1.weight has shape \(96, 32\)"):
        C.verify_checkpoint(wrong)

    weights = os.path.join(ck, C.WEIGHTS_DIR)
    shard = sorted(f for f in os.listdir(weights) if f.endswith(".distcp"))[0]
    path = os.path.join(weights, shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UserError, match=f"{shard} is truncated"):
        C.verify_checkpoint(ck)
    with pytest.raises(UserError, match=f"{shard} is truncated"):
        C.load_canonical_checkpoint(ck)
    os.remove(path)
    with pytest.raises(UserError, match=f"{shard} is missing"):
        C.verify_checkpoint(ck)
    with pytest.raises(UserError, match="not a megatron_effllm checkpoint"):
        C.read_checkpoint_info(str(tmp_path))


# ----------------------------------------------------------------------------- CLIs
def _run(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd="/",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_help_documents_every_flag():
    for module, flags in ((TO_MEGATRON, ["--hf", "--out", "--tp", "--pp", "--dtype"]),
                          (TO_HF, ["--ckpt", "--out", "--dtype"])):
        res = _run(module, "--help")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        for flag in flags:
            i = next(i for i, l in enumerate(lines) if l.strip().startswith(flag))
            # "--flag METAVAR  help text" (argparse may wrap the help onto the next line)
            words = lines[i].split()[2:] + (lines[i + 1].split() if i + 1 < len(lines) else [])
            assert len(words) >= 3 and not words[0].startswith("-"), (flag, lines[i])


def _tiny_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)


def test_cli_round_trip_hf_megatron_hf_is_exact(tmp_path):
    """HF folder -> effllm-convert-megatron (a real process) -> effllm-convert-hf -> equal."""
    from megatron_effllm.convert.hf_io import load_hf_model

    hf, arch, sd = tiny_hf("llama")
    src = str(tmp_path / "hf")
    hf.save_pretrained(src)
    _tiny_tokenizer(src)
    ck, back = str(tmp_path / "ck"), str(tmp_path / "back")
    res = _run(TO_MEGATRON, "--hf", src, "--out", ck, "--tp", "1", "--pp", "2")
    assert res.returncode == 0, res.stderr
    assert os.path.isfile(os.path.join(ck, "tokenizer", "tokenizer.json"))
    # The way back in this process (the subprocess above covered the command-line path).
    _load_tool(TO_HF)(["--ckpt", ck, "--out", back, "--dtype", "fp32"])
    out = load_hf_model(back)
    assert out.arch == arch and out.tokenizer_dir is not None
    assert_same(dict(out.state_dict), sd)


def _expect_cli_error(capsys, main, argv, out, match):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not os.path.exists(out)
    assert [p for p in os.listdir(os.path.dirname(out)) if "partial" in p] == []


def _load_tool(module):
    return importlib.import_module(module).main


def test_cli_bad_input_gives_one_line_error_and_no_output(tmp_path, capsys):
    to_megatron, to_hf = _load_tool(TO_MEGATRON), _load_tool(TO_HF)
    hf, _, _ = tiny_hf("llama")
    src = str(tmp_path / "hf")
    hf.save_pretrained(src)
    out = str(tmp_path / "out")

    _expect_cli_error(capsys, to_megatron, ["--hf", src, "--out", out, "--tp", "3"], out,
                      "not divisible by tensor parallel size 3")
    _expect_cli_error(capsys, to_megatron, ["--hf", src, "--out", out, "--pp", "4"], out,
                      "3 layers cannot fill 4 pipeline stages")

    weights = os.path.join(src, "model.safetensors")
    with open(weights, "rb") as f:
        blob = f.read()
    with open(weights, "wb") as f:
        f.write(blob[: len(blob) // 2])
    _expect_cli_error(capsys, to_megatron, ["--hf", src, "--out", out], out, "model.safetensors")
    os.remove(weights)
    _expect_cli_error(capsys, to_megatron, ["--hf", src, "--out", out], out, src)

    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(cfg_path, "w"))
    _expect_cli_error(capsys, to_megatron, ["--hf", src, "--out", out], out, "gpt2")
    _expect_cli_error(capsys, to_hf, ["--ckpt", str(tmp_path / "nope"), "--out", out], out,
                      "does not exist")
    _expect_cli_error(capsys, to_hf, ["--ckpt", src, "--out", out], out,
                      "not a megatron_effllm checkpoint")


# ----------------------------------------------------------------------------- real model
def test_real_smollm2_conversion_logits_and_greedy_generation(tmp_path):
    """REAL MODEL (SmolLM2-135M-Instruct GGUF): HF -> megatron checkpoint -> megatron model;
    logits match HF in fp32 and 8 greedy tokens are identical."""
    from transformers import AutoTokenizer

    from megatron_effllm.assets import smollm2_gguf
    from megatron_effllm.convert.hf_io import build_hf_model, load_hf_model
    from megatron_effllm.convert.megatron_checkpoint import load_megatron_model, save_canonical_checkpoint
    from megatron_effllm.model import greedy_generate, forward_logits

    torch.set_num_threads(2)
    t0 = time.time()
    src = load_hf_model(smollm2_gguf())
    t1 = time.time()
    ck = str(tmp_path / "smollm2")
    save_canonical_checkpoint(src.arch, src.state_dict, ck, src.tokenizer_dir)
    t2 = time.time()
    arch, model = load_megatron_model(ck, tp=1, pp=1)
    t3 = time.time()
    print(f"SmolLM2: read GGUF {t1 - t0:.1f}s, write checkpoint {t2 - t1:.1f}s, "
          f"load megatron model {t3 - t2:.1f}s")
    assert arch == src.arch

    tok = AutoTokenizer.from_pretrained(os.path.join(ck, "tokenizer"))
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    hf = build_hf_model(src.arch, src.state_dict, attn_implementation="eager")
    want = hf_logits(hf, ids)
    got = forward_logits(model, ids)
    want_first, got_first = want.clone(), got.clone()
    diff = (got - want).abs().max().item()
    print(f"SmolLM2 TP=1 max abs logit diff {diff:.2e} (logit range {want.abs().max().item():.1f})")
    if diff > 1e-3:  # say which side was wrong, and whether a second evaluation agrees
        again = (forward_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
        pytest.fail(
            f"logit diff {diff:.3g}; max |HF| {want_first.abs().max():.3g}, max |megatron| "
            f"{got_first.abs().max():.3g}; changed since: HF {(want - want_first).abs().max():.3g}, "
            f"megatron {(got - got_first).abs().max():.3g}; diff on re-evaluation {again:.3g}"
        )

    mine = greedy_generate(model, ids, 8)
    theirs = hf.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    print(f"SmolLM2 greedy: {tok.decode(mine[0, ids.shape[1]:])!r} ({time.time() - t3:.1f}s)")
    assert torch.equal(mine, theirs)
