"""Hugging Face folders and GGUF files <-> Architecture + canonical state dict."""
import errno
import json
import os
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm.convert import hf_io
from megatron_effllm.errors import UserError
from megatron_effllm.layout import canonical_shapes, check_state_dict

VOCAB = 128


def random_state_dict(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g) * (0.2 if len(shape) > 1 else 1.0)
        + (1.0 if name.endswith("layernorm.weight") or name == "model.norm.weight" else 0.0)
        for name, shape in canonical_shapes(arch).items()
    }


def uniform_arch(family, tied, **kw):
    return Architecture.uniform(
        family=family, num_layers=2, hidden_size=32, num_heads=4, num_kv_groups=2,
        ffn_hidden_size=48, vocab_size=VOCAB, tie_word_embeddings=tied,
        qkv_bias=(family == "qwen2"), rope_theta=10000.0 if family != "qwen2" else 1e6,
        extra={"bos_token_id": 1, "eos_token_id": 2}, **kw,
    )


def non_uniform_arch(family="llama", tied=False):
    """Different heads / KV groups / FFN per layer, source layer 1 removed, hidden size 40
    (not a multiple of 6 heads), head_dim 16."""
    layers = [LayerShape(6, 3, 64, 0), LayerShape(4, 1, 24, 2), LayerShape(2, 2, 8, 3)]
    return Architecture(
        family=family, hidden_size=40, head_dim=16, vocab_size=VOCAB, layers=layers,
        num_source_layers=4, tie_word_embeddings=tied, qkv_bias=(family == "qwen2"),
        rope_theta=5e4, rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_scaling=None if family != "llama" else {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    )


def tokens(n=2, length=9, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def assert_same_tensors(got, want):
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


# ------------------------------------------------------------------------------- uniform
@pytest.mark.parametrize(
    "family, tied", [("llama", True), ("llama", False), ("qwen2", True), ("mistral", False)]
)
def test_uniform_round_trip_loads_in_stock_transformers(tmp_path, family, tied):
    arch = uniform_arch(family, tied)
    sd = check_state_dict(arch, random_state_dict(arch), "test")
    out = tmp_path / "model"
    hf_io.save_hf_model(arch, sd, str(out), dtype=torch.float32)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and "auto_map" not in cfg and cfg["head_dim"] == 8
    assert not (out / "modeling_effllm.py").exists()

    back = hf_io.load_hf_model(str(out))
    assert back.arch == arch
    assert_same_tensors(back.state_dict, sd)
    assert back.tokenizer_dir is None

    reference = hf_io.build_hf_model(arch, sd)
    assert (reference.lm_head.weight is reference.model.embed_tokens.weight) == tied
    stock = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # no trust_remote_code
    assert type(stock).__name__ == type(reference).__name__
    assert stock.dtype == torch.float32
    assert torch.equal(stock.lm_head.weight, sd.get("lm_head.weight", sd["model.embed_tokens.weight"]))
    with torch.no_grad():
        assert torch.equal(stock(tokens()).logits, reference(tokens()).logits)
    assert_same_tensors(hf_io.canonical_state_dict(stock), sd)


def test_bf16_save_rounds_once_and_loads_in_requested_dtype(tmp_path):
    arch = uniform_arch("llama", tied=True)
    sd = check_state_dict(arch, random_state_dict(arch), "test")
    hf_io.save_hf_model(arch, sd, str(tmp_path / "m"))  # default bf16
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    back = hf_io.load_hf_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert_same_tensors(back.state_dict, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    as_fp32 = hf_io.load_hf_model(str(tmp_path / "m"))
    assert all(v.dtype == torch.float32 for v in as_fp32.state_dict.values())


def test_depth_pruned_uniform_keeps_source_indices_in_a_stock_config(tmp_path):
    arch = uniform_arch("llama", tied=False)
    arch = arch.replace(layers=[LayerShape(4, 2, 48, 0), LayerShape(4, 2, 48, 3)], num_source_layers=5)
    assert not hf_io.needs_remote_code(arch)
    sd = random_state_dict(arch)
    hf_io.save_hf_model(arch, sd, str(tmp_path / "m"), dtype=torch.float32)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    assert hf_io.load_hf_model(str(tmp_path / "m")).arch == arch


def test_reads_folders_written_by_transformers_sharded_and_bin(tmp_path):
    arch = uniform_arch("mistral", tied=False)
    sd = check_state_dict(arch, random_state_dict(arch), "test")
    model = hf_io.build_hf_model(arch, sd)

    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert_same_tensors(hf_io.load_hf_model(str(tmp_path / "hf")).state_dict, sd)

    hf_io.save_hf_model(arch, sd, str(tmp_path / "ours"), dtype=torch.float32, max_shard_size="20KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == 4 * sum(v.numel() for v in sd.values())
    assert_same_tensors(hf_io.load_hf_model(str(tmp_path / "ours")).state_dict, sd)
    sharded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(sharded(tokens()).logits, model(tokens()).logits)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    assert_same_tensors(hf_io.load_hf_model(str(bin_dir)).state_dict, sd)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    arch = uniform_arch("llama", tied=True)
    sd = random_state_dict(arch)
    out = tmp_path / "m"
    hf_io.save_hf_model(arch, sd, str(out), dtype=torch.float32)
    with pytest.raises(UserError, match="already exists; choose a new folder or pass --overwrite"):
        hf_io.save_hf_model(arch, sd, str(out))
    sd2 = random_state_dict(arch, seed=5)
    hf_io.save_hf_model(arch, sd2, str(out), dtype=torch.float32, overwrite=True)
    assert_same_tensors(hf_io.load_hf_model(str(out)).state_dict, check_state_dict(arch, sd2, "t"))

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(UserError, match=f"could not write .*new \\({os.strerror(errno.ENOSPC)}.*nothing was left"):
        hf_io.save_hf_model(arch, sd, str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no partial folder left behind
    with pytest.raises(UserError, match="the previous .*m is unchanged"):
        hf_io.save_hf_model(arch, sd, str(out), overwrite=True)
    assert_same_tensors(hf_io.load_hf_model(str(out)).state_dict, check_state_dict(arch, sd2, "t"))
    assert sorted(os.listdir(tmp_path)) == ["m"]

    bad = dict(sd)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(47, 32)
    with pytest.raises(UserError, match=r"up_proj.weight has shape \(47, 32\).*implies \(48, 32\)"):
        hf_io.save_hf_model(arch, bad, str(tmp_path / "new"))


def test_tokenizer_files_are_copied(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2").save_pretrained(str(tmp_path / "tok"))
    arch = uniform_arch("llama", tied=True)
    hf_io.save_hf_model(arch, random_state_dict(arch), str(tmp_path / "m"), tokenizer_dir=str(tmp_path / "tok"))
    back = hf_io.load_hf_model(str(tmp_path / "m"))
    assert back.tokenizer_dir == str(tmp_path / "m")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(back.tokenizer_dir)("w5 w7")["input_ids"] == [5, 7]
    with pytest.raises(UserError, match="holds no tokenizer files"):
        hf_io.save_hf_model(arch, random_state_dict(arch), str(tmp_path / "x"), tokenizer_dir=str(tmp_path))


# ------------------------------------------------------------------------------- non-uniform
@pytest.mark.parametrize("family, tied", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_non_uniform_export_loads_with_remote_code_and_generates(tmp_path, family, tied):
    arch = non_uniform_arch(family, tied)
    assert not arch.is_uniform and hf_io.needs_remote_code(arch)
    sd = check_state_dict(arch, random_state_dict(arch, seed=3), "test")
    out = tmp_path / f"pruned_{family}"
    hf_io.save_hf_model(arch, sd, str(out), dtype=torch.float32)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "effllm" and cfg["effllm_family"] == family
    assert cfg["num_attention_heads_per_layer"] == [6, 4, 2]
    assert cfg["num_key_value_heads_per_layer"] == [3, 1, 2]
    assert cfg["intermediate_size_per_layer"] == [64, 24, 8]
    assert cfg["source_layer_indices"] == [0, 2, 3] and cfg["num_source_layers"] == 4
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    # the remote code must not need this project installed
    for name in hf_io.REMOTE_CODE_FILES:
        assert "megatron_effllm" not in (out / name).read_text()

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    reference = hf_io.build_hf_model(arch, sd)
    assert type(loaded).__name__ == type(reference).__name__
    shapes = [(l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features, l.mlp.up_proj.out_features)
              for l in loaded.model.layers]
    assert shapes == [(96, 48, 64), (64, 16, 24), (32, 32, 8)]
    with torch.no_grad():
        assert torch.equal(loaded(tokens()).logits, reference(tokens()).logits)
    assert_same_tensors(hf_io.canonical_state_dict(loaded), sd)

    prompt = tokens(n=1, length=6, seed=4)
    generated = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 11)
    assert torch.equal(generated, greedy_without_cache(reference, prompt, 5))

    back = hf_io.load_hf_model(str(out))
    assert back.arch == arch
    assert_same_tensors(back.state_dict, sd)


def test_remote_layers_follow_a_later_attention_switch(tmp_path):
    arch = non_uniform_arch("llama")
    sd = random_state_dict(arch)
    model = hf_io.build_hf_model(arch, sd, attn_implementation="eager")
    assert model.model.layers[1].self_attn.config._attn_implementation == "eager"
    with torch.no_grad():
        eager = model(tokens()).logits
        model.set_attn_implementation("sdpa")
        assert model.model.layers[1].self_attn.config._attn_implementation == "sdpa"
        assert torch.allclose(model(tokens()).logits, eager, atol=1e-5)


def test_llama_hidden_not_multiple_of_heads_uses_remote_code(tmp_path):
    arch = Architecture.uniform(num_layers=2, hidden_size=40, num_heads=6, num_kv_groups=2,
                                ffn_hidden_size=32, vocab_size=VOCAB, head_dim=8)
    assert arch.is_uniform and hf_io.needs_remote_code(arch)
    sd = random_state_dict(arch)
    hf_io.save_hf_model(arch, sd, str(tmp_path / "m"), dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens()).logits, hf_io.build_hf_model(arch, sd)(tokens()).logits)


# ------------------------------------------------------------------------------- bad input
def _save_tiny(tmp_path, name="m"):
    arch = uniform_arch("llama", tied=False)
    hf_io.save_hf_model(arch, random_state_dict(arch), str(tmp_path / name), dtype=torch.float32)
    return tmp_path / name


def test_missing_path_and_non_model_file(tmp_path):
    with pytest.raises(UserError, match=r"nowhere does not exist.*config.json"):
        hf_io.load_hf_model(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="notes.txt is a file but not a .gguf"):
        hf_io.load_hf_model(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="has no config.json"):
        hf_io.load_hf_model(str(tmp_path))


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 128}))
    with pytest.raises(UserError, match=r"config.json: unsupported model_type 'gpt2'"):
        hf_io.load_hf_model(str(tmp_path))


def test_missing_weights_and_missing_shard(tmp_path):
    out = _save_tiny(tmp_path)
    (out / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights file"):
        hf_io.load_hf_model(str(out))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors is missing"):
        hf_io.load_hf_model(str(out))


def test_truncated_safetensors(tmp_path):
    out = _save_tiny(tmp_path)
    path = out / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model.safetensors is not a readable safetensors file.*truncated"):
        hf_io.load_hf_model(str(out))
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match="truncated or corrupted"):
        hf_io.load_hf_model(str(out))


def test_config_that_does_not_match_the_weights(tmp_path):
    out = _save_tiny(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    wrong_kv = dict(cfg, num_key_value_heads=4)
    (out / "config.json").write_text(json.dumps(wrong_kv))
    with pytest.raises(UserError, match=r"k_proj.weight has shape \(16, 32\) but the config implies \(32, 32\)"):
        hf_io.load_hf_model(str(out))
    (out / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(UserError, match=r"model.layers.2.input_layernorm.weight is missing"):
        hf_io.load_hf_model(str(out))
    (out / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True, num_hidden_layers=1)))
    with pytest.raises(UserError, match=r"unexpected weight model.layers.1"):
        hf_io.load_hf_model(str(out))
    (out / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(UserError, match="lacks the field 'hidden_size'"):
        hf_io.load_hf_model(str(out))


def _tiny_gguf(path, architecture):
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("architecture", ["gpt2", "gemma3"])
def test_gguf_of_another_architecture(tmp_path, architecture):
    path = tmp_path / f"tiny-{architecture}.gguf"
    _tiny_gguf(path, architecture)
    with pytest.raises(UserError, match=rf"tiny-{architecture}.gguf: GGUF architecture '{architecture}' is not supported"):
        hf_io.load_hf_model(str(path))
    path.write_bytes(b"GGUF" + b"\x00" * 5)
    with pytest.raises(UserError, match="is not a readable GGUF file"):
        hf_io.load_hf_model(str(path))


# ------------------------------------------------------------------------------- real model
def test_real_smollm2_gguf_and_its_cached_hf_folder():
    """Real model: SmolLM2-135M-Instruct through transformers' GGUF loader (about 15-20 s, plus
    as much again the first time, when the cached HF folder is converted)."""
    from transformers import AutoTokenizer

    from megatron_effllm import assets

    start = time.perf_counter()
    src = hf_io.load_hf_model(assets.smollm2_gguf())
    seconds = time.perf_counter() - start
    arch = src.arch
    assert (arch.family, arch.num_layers, arch.hidden_size, arch.head_dim) == ("llama", 30, 576, 64)
    assert {(l.num_heads, l.num_kv_groups, l.ffn_hidden_size) for l in arch.layers} == {(9, 3, 1536)}
    assert arch.vocab_size == 49152 and arch.tie_word_embeddings and arch.rope_theta == 1e5
    assert arch.num_params() == 134_515_008
    assert sum(v.numel() for v in src.state_dict.values()) == 134_515_008
    assert "lm_head.weight" not in src.state_dict
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    assert len(tokenizer) == 49152
    assert tokenizer.decode(tokenizer("The capital of France")["input_ids"]) == "The capital of France"
    print(f"\nSmolLM2 GGUF load: {seconds:.1f} s")
    assert seconds < 120

    # The cached Hugging Face copy: a stock Llama folder holding the GGUF weights rounded to bf16.
    folder = assets.smollm2_hf_dir()
    assert json.loads(open(os.path.join(folder, "config.json")).read())["model_type"] == "llama"
    copy = hf_io.load_hf_model(folder, dtype=torch.bfloat16)
    assert copy.arch == arch and copy.tokenizer_dir == folder
    assert_same_tensors(copy.state_dict, {k: v.to(torch.bfloat16) for k, v in src.state_dict.items()})
    assert AutoTokenizer.from_pretrained(folder)("Hello world")["input_ids"] == tokenizer("Hello world")["input_ids"]
