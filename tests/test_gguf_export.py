"""GGUF export: metadata and tensors llama.cpp expects, read back two independent ways.

Uniform models are read back by transformers' GGUF loader (which undoes llama.cpp's q/k row
order on its own). Non-uniform models (llama.cpp's ``deci`` architecture) are checked against a
small forward pass written here with llama.cpp's semantics: RoPE on adjacent pairs, per-layer
head counts from the metadata arrays, ``rope_freqs`` divisors for Llama-3 scaling.
"""
import os
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm.convert import gguf_export, hf_io
from megatron_effllm.errors import UserError
from megatron_effllm.layout import canonical_shapes, check_state_dict

VOCAB = 320  # > the 256 byte-level base tokens of the test tokenizer: the rest is padding
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small real byte-level BPE tokenizer (GPT-2 style, like SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>").save_pretrained(str(path))
    return str(path)


def random_state_dict(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return check_state_dict(arch, {
        k: torch.randn(s, generator=g) * 0.1 + (1.0 if "norm" in k else 0.0)
        for k, s in canonical_shapes(arch).items()
    }, "test")


def uniform(family="llama", tied=False, **kw):
    return Architecture.uniform(
        family=family, num_layers=2, hidden_size=64, num_heads=4, num_kv_groups=2, ffn_hidden_size=96,
        vocab_size=VOCAB, tie_word_embeddings=tied, qkv_bias=family == "qwen2",
        extra={"bos_token_id": 1, "eos_token_id": 0}, **kw,
    )


def non_uniform(rope_scaling=None):
    layers = [LayerShape(6, 3, 96, 0), LayerShape(4, 1, 32, 2), LayerShape(2, 2, 64, 3)]
    return Architecture(family="llama", hidden_size=48, head_dim=16, vocab_size=VOCAB, layers=layers,
                        num_source_layers=4, rope_theta=5e4, rms_norm_eps=1e-6, rope_scaling=rope_scaling,
                        extra={"bos_token_id": 1, "eos_token_id": 0})


def tokens(seed=1, length=11):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    tensors = {
        t.name: (t.tensor_type.name, torch.from_numpy(
            np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)))
        for t in reader.tensors
    }
    return meta, tensors


def llamacpp_forward(meta, tensors, ids):
    """Logits of a llama/deci GGUF computed the way llama.cpp does (fp32, no KV cache)."""
    arch = meta["general.architecture"]
    n_layers = meta[f"{arch}.block_count"]
    per_layer = lambda v: v if isinstance(v, list) else [v] * n_layers  # noqa: E731
    heads = per_layer(meta[f"{arch}.attention.head_count"])
    kv_heads = per_layer(meta[f"{arch}.attention.head_count_kv"])
    d = meta[f"{arch}.attention.key_length"]
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = meta[f"{arch}.rope.freq_base"]
    W = {name: t for name, (_, t) in tensors.items()}
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if "rope_freqs.weight" in W:
        inv_freq = inv_freq / W["rope_freqs.weight"].double()
    angles = torch.arange(ids.shape[1], dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = angles.cos().float(), angles.sin().float()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope_adjacent_pairs(x):  # x [B, T, H, d]: rotate (x[2j], x[2j+1]) by angle j
        even, odd = x[..., 0::2], x[..., 1::2]
        c, s = cos[None, :, None], sin[None, :, None]
        return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)

    x = W["token_embd.weight"][ids]
    B, T = ids.shape
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(n_layers):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope_adjacent_pairs((h @ W[p + "attn_q.weight"].T).view(B, T, heads[i], d))
        k = rope_adjacent_pairs((h @ W[p + "attn_k.weight"].T).view(B, T, kv_heads[i], d))
        v = (h @ W[p + "attn_v.weight"].T).view(B, T, kv_heads[i], d)
        group = heads[i] // kv_heads[i]
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5 + mask
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, heads[i] * d)
        x = x + attn @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        gate, up = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ W[p + "ffn_down.weight"].T
    x = rms(x, W["output_norm.weight"])
    return x @ W.get("output.weight", W["token_embd.weight"]).T


# ------------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("dtype, tied, rel_tol", [
    ("f32", False, 1e-6), ("f32", True, 1e-6), ("f16", False, 5e-3), ("q8_0", True, 8e-2),
])
def test_uniform_llama_reads_back_in_transformers(tmp_path, tokenizer_dir, dtype, tied, rel_tol):
    arch = uniform(tied=tied)
    sd = random_state_dict(arch)
    out = tmp_path / f"model-{dtype}.gguf"
    assert gguf_export.write_gguf(arch, sd, str(out), dtype=dtype, tokenizer_dir=tokenizer_dir) == "llama"

    meta, tensors = read_gguf(str(out))
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.context_length"]) == (2, 64, 2048)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.feed_forward_length"] == 96 and meta["llama.rope.dimension_count"] == 16
    assert meta["llama.rope.freq_base"] == 10000.0 and meta["llama.vocab_size"] == VOCAB
    assert ("output.weight" in tensors) == (not tied)
    weight_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    assert tensors["blk.1.attn_q.weight"][0] == weight_type and tensors["blk.1.ffn_down.weight"][0] == weight_type
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert tuple(tensors["blk.0.attn_k.weight"][1].shape) == (32, 64)
    # v/o/MLP rows keep their order; q/k rows are reordered for adjacent-pair RoPE
    if dtype == "f32":
        assert torch.equal(tensors["blk.0.attn_v.weight"][1], sd["model.layers.0.self_attn.v_proj.weight"])

    reference = hf_io.build_hf_model(arch, sd)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = reference(tokens()).logits, loaded(tokens()).logits
    assert (got - want).abs().max() <= rel_tol * want.abs().max()
    with torch.no_grad():  # the reference forward agrees with transformers on llama.cpp's layout
        assert torch.allclose(llamacpp_forward(meta, tensors, tokens()), got, atol=1e-4)


def test_tokenizer_from_hf_folder_round_trips(tmp_path, tokenizer_dir):
    arch = uniform()
    out = tmp_path / "m.gguf"
    gguf_export.write_gguf(arch, random_state_dict(arch), str(out), dtype="f16", tokenizer_dir=tokenizer_dir)
    import gguf

    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    token_list = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(token_list) == VOCAB and token_list[-1] == f"[PAD{VOCAB - 1}]"
    assert types[0] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 0
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0

    original = AutoTokenizer.from_pretrained(tokenizer_dir)
    from_gguf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in ("hello world, the lazy fox!", "quick brown dogs jump"):
        assert from_gguf(text)["input_ids"] == original(text)["input_ids"]

    # the tokenizer keys of one GGUF can be copied into another
    copy = tmp_path / "copy.gguf"
    gguf_export.write_gguf(arch, random_state_dict(arch), str(copy), dtype="f32", tokenizer_gguf=str(out))
    copied = gguf.GGUFReader(str(copy)).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert copied[key].contents() == fields[key].contents()


def test_uniform_qwen2_keeps_bias_and_half_split_rope(tmp_path, tokenizer_dir):
    arch = uniform("qwen2", tied=True)
    sd = random_state_dict(arch)
    out = tmp_path / "qwen.gguf"
    assert gguf_export.write_gguf(arch, sd, str(out), dtype="f32", tokenizer_dir=tokenizer_dir) == "qwen2"
    meta, tensors = read_gguf(str(out))
    assert torch.equal(tensors["blk.1.attn_q.weight"][1], sd["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(tensors["blk.1.attn_k.bias"][1], sd["model.layers.1.self_attn.k_proj.bias"])
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = hf_io.build_hf_model(arch, sd)(tokens()).logits, loaded(tokens()).logits
    assert (got - want).abs().max() <= 1e-5


# ------------------------------------------------------------------------------- non-uniform
def test_non_uniform_model_is_written_as_deci_with_per_layer_arrays(tmp_path, tokenizer_dir):
    arch = non_uniform(rope_scaling=LLAMA3)
    sd = random_state_dict(arch, seed=2)
    out = tmp_path / "pruned.gguf"
    assert gguf_export.write_gguf(arch, sd, str(out), dtype="f32", tokenizer_dir=tokenizer_dir) == "deci"

    meta, tensors = read_gguf(str(out))
    assert meta["general.architecture"] == "deci" and meta["deci.block_count"] == 3
    assert meta["deci.attention.head_count"] == [6, 4, 2]
    assert meta["deci.attention.head_count_kv"] == [3, 1, 2]
    assert meta["deci.feed_forward_length"] == [96, 32, 64]
    assert meta["deci.attention.key_length"] == meta["deci.attention.value_length"] == 16
    assert meta["deci.embedding_length"] == 48  # not heads * head_dim in any layer
    assert [tuple(tensors[f"blk.{i}.attn_k.weight"][1].shape) for i in range(3)] == [(48, 48), (16, 48), (32, 48)]
    assert tuple(tensors["blk.1.ffn_down.weight"][1].shape) == (48, 32)

    # q/k rows: per layer, each head's (j, j + d/2) rows became rows (2j, 2j + 1)
    q = sd["model.layers.1.self_attn.q_proj.weight"].view(4, 2, 8, 48)
    assert torch.equal(tensors["blk.1.attn_q.weight"][1].view(4, 8, 2, 48), q.transpose(1, 2))

    with torch.no_grad():
        want = hf_io.build_hf_model(arch, sd)(tokens()).logits
        got = llamacpp_forward(meta, tensors, tokens())
    assert (got - want).abs().max() <= 1e-4


def test_llama3_rope_factors_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arch = non_uniform(rope_scaling={**LLAMA3, "original_max_position_embeddings": 64})
    config = hf_io.hf_config(arch)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 1.0 / arch.rope_theta ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    factors = torch.from_numpy(gguf_export.llama3_rope_factors(arch)).double()
    assert {1.0, 8.0} <= set(factors.tolist())  # both ends and the smooth band are exercised
    assert torch.allclose(plain / factors, scaled.double(), rtol=1e-6)


# ------------------------------------------------------------------------------- bad input
def test_bad_requests(tmp_path, tokenizer_dir):
    arch = uniform()
    sd = random_state_dict(arch)
    with pytest.raises(UserError, match="unknown GGUF dtype 'q4'"):
        gguf_export.write_gguf(arch, sd, str(tmp_path / "a.gguf"), dtype="q4", tokenizer_dir=tokenizer_dir)
    with pytest.raises(UserError, match="needs a tokenizer"):
        gguf_export.write_gguf(arch, sd, str(tmp_path / "a.gguf"))
    (tmp_path / "a.gguf").write_bytes(b"x")
    with pytest.raises(UserError, match="already exists; choose a new file or remove it"):
        gguf_export.write_gguf(arch, sd, str(tmp_path / "a.gguf"), tokenizer_dir=tokenizer_dir)
    with pytest.raises(UserError, match="was not written by megatron_effllm"):  # not a GGUF exported here
        gguf_export.write_gguf(arch, sd, str(tmp_path / "a.gguf"), tokenizer_dir=tokenizer_dir, overwrite=True)
    assert (tmp_path / "a.gguf").read_bytes() == b"x"
    gguf_export.write_gguf(arch, sd, str(tmp_path / "b.gguf"), tokenizer_dir=tokenizer_dir)
    with pytest.raises(UserError, match="already exists; choose a new file or pass --overwrite"):
        gguf_export.write_gguf(arch, sd, str(tmp_path / "b.gguf"), tokenizer_dir=tokenizer_dir)
    gguf_export.write_gguf(arch, sd, str(tmp_path / "b.gguf"), tokenizer_dir=tokenizer_dir, overwrite=True)
    qwen = Architecture(family="qwen2", hidden_size=64, head_dim=16, vocab_size=VOCAB, qkv_bias=True,
                        layers=[LayerShape(4, 2, 96, 0), LayerShape(2, 2, 96, 1)], num_source_layers=2)
    with pytest.raises(UserError, match="Qwen2 model with per-layer widths"):
        gguf_export.write_gguf(qwen, random_state_dict(qwen), str(tmp_path / "q.gguf"), tokenizer_dir=tokenizer_dir)
    yarn = uniform(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UserError, match="RoPE scaling 'yarn' is not supported"):
        gguf_export.write_gguf(yarn, sd, str(tmp_path / "y.gguf"), tokenizer_dir=tokenizer_dir)
    small = uniform().replace(vocab_size=100)
    with pytest.raises(UserError, match="tokenizer has 298 tokens but the model only 100"):
        gguf_export.write_gguf(small, random_state_dict(small), str(tmp_path / "s.gguf"), tokenizer_dir=tokenizer_dir)
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "b.gguf"]  # nothing half-written left behind


def test_cli(tmp_path, tokenizer_dir, capsys):
    from megatron_effllm.cli import export_gguf

    arch = uniform(tied=True)
    hf_io.save_hf_model(arch, random_state_dict(arch), str(tmp_path / "hf"), tokenizer_dir=tokenizer_dir,
                        dtype=torch.float32)
    export_gguf.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0"])
    assert "llama" in capsys.readouterr().out
    meta, tensors = read_gguf(str(tmp_path / "m.gguf"))
    assert meta["general.file_type"] == 7 and tensors["token_embd.weight"][0] == "Q8_0"
    with pytest.raises(SystemExit) as exit_info:
        export_gguf.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m.gguf")])
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------- real model
def test_real_smollm2_exports_to_gguf(tmp_path):
    """Real model: the cached SmolLM2 folder -> f16 GGUF with the source GGUF's tokenizer; the
    llama.cpp-semantics forward over the GGUF tensors matches the folder's logits on a real
    sentence (about 20 s)."""
    from megatron_effllm import assets

    folder = assets.smollm2_hf_dir()
    out = tmp_path / "smollm2-f16.gguf"
    start = time.perf_counter()
    assert gguf_export.export_gguf(folder, str(out), dtype="f16", tokenizer_gguf=assets.smollm2_gguf()) == "llama"
    seconds = time.perf_counter() - start
    meta, tensors = read_gguf(str(out))
    import gguf

    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert meta["llama.attention.head_count"] == 9 and meta["llama.block_count"] == 30
    assert tensors["blk.29.ffn_up.weight"][0] == "F16" and "output.weight" not in tensors

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(ids).logits
        got = llamacpp_forward(meta, tensors, ids)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    assert torch.equal(got[0, -1].argmax(), want[0, -1].argmax())
    print(f"\nSmolLM2 f16 GGUF export: {seconds:.1f} s, {out.stat().st_size / 2**20:.0f} MiB, "
          f"max |logit diff| {(got - want).abs().max():.2e}")
