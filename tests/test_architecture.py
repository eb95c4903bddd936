import json

import pytest

from megatron_effllm.architecture import Architecture, ArchitectureError, LayerShape


def smollm2_like():
    return Architecture.uniform(
        num_layers=30, hidden_size=576, num_heads=9, num_kv_groups=3, ffn_hidden_size=1536,
        vocab_size=49152, tie_word_embeddings=True, rope_theta=1e5,
    )


def test_parameter_count_matches_smollm2():
    arch = smollm2_like()
    # SmolLM2-135M: 134,515,008 parameters with tied embeddings.
    assert arch.num_params() == 134_515_008
    assert arch.num_params(include_embeddings=False) == 134_515_008 - 49152 * 576


def test_json_round_trip_non_uniform():
    arch = smollm2_like()
    layers = [LayerShape(6, 3, 1000 + i, i) for i in range(0, 30, 2)]
    small = arch.with_layers(layers).replace(hidden_size=512, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    again = Architecture.from_json(small.to_json())
    assert again == small
    assert not again.is_uniform and arch.is_uniform
    assert json.loads(small.to_json())["schema_version"] == 1


@pytest.mark.parametrize(
    "layers, tp, message",
    [
        ([LayerShape(8, 3, 64, 0)], 1, "not divisible by 3 KV groups"),
        ([LayerShape(6, 3, 64, 0)], 2, "KV groups 3 not divisible by tensor parallel size 2"),
        ([LayerShape(4, 2, 63, 0)], 2, "FFN width 63 not divisible"),
        ([LayerShape(4, 2, 0, 0)], 1, "remove the whole layer"),
        ([LayerShape(4, 2, 8, 1), LayerShape(4, 2, 8, 0)], 1, "source order"),
    ],
)
def test_validation_names_the_problem(layers, tp, message):
    arch = Architecture.uniform(num_layers=2, hidden_size=64, num_heads=4, num_kv_groups=2,
                                ffn_hidden_size=8, vocab_size=100)
    with pytest.raises(ArchitectureError, match=message):
        arch.with_layers(layers).validate(tensor_parallel=tp)


def test_from_hf_config_families():
    base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=128, rms_norm_eps=1e-6, rope_theta=5e5,
                tie_word_embeddings=False, max_position_embeddings=256)
    llama = Architecture.from_hf_config({**base, "model_type": "llama"})
    qwen = Architecture.from_hf_config({**base, "model_type": "qwen2"})
    assert (llama.family, llama.qkv_bias, llama.head_dim, llama.rope_theta) == ("llama", False, 16, 5e5)
    assert qwen.qkv_bias
    with pytest.raises(ArchitectureError, match="unsupported model_type 'gpt2'"):
        Architecture.from_hf_config({**base, "model_type": "gpt2"})
