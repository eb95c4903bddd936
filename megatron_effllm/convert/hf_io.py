"""Hugging Face checkpoints <-> the canonical state dict.

Reads a Hugging Face Llama / Qwen2 / Mistral folder (safetensors, sharded or not, or
``pytorch_model*.bin``), a ``.gguf`` file (through transformers' GGUF loader), or a folder this
project exported, into an ``Architecture`` plus the canonical state dict (see
``layout.canonical``). Writes them back as a folder that stock transformers loads: a plain
family config when one width per field describes the model, otherwise a config with per-layer
lists and the small model class of ``hf_remote`` (``trust_remote_code=True``).

Folders are read tensor by tensor with ``safetensors.safe_open``, never by instantiating the
model, so loading costs one copy of the weights.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Optional

import gguf
import safetensors.torch
import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.initialization import no_init_weights

from megatron_effllm import output_dir
from megatron_effllm.architecture import Architecture
from megatron_effllm.cache import cache_dir
from megatron_effllm.convert.hf_remote.configuration_effllm import CONFIG_CLASSES
from megatron_effllm.convert.hf_remote.modeling_effllm import MODEL_CLASSES
from megatron_effllm.errors import UserError
from megatron_effllm.layout.canonical import check_state_dict

HF_REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
REMOTE_CODE_FILES = ("configuration_effllm.py", "modeling_effllm.py")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json",
)
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass
class HFSource:
    """A model read from disk: its shape, its canonical weights, and where its tokenizer is."""

    arch: Architecture
    state_dict: dict[str, torch.Tensor]
    tokenizer_dir: Optional[str]


# ---------------------------------------------------------------------------------- configs
def needs_remote_code(arch: Architecture) -> bool:
    """True when no stock transformers config can describe ``arch``.

    Per-layer widths need the project's config; so does a Llama whose hidden size is not a
    multiple of its head count (stock LlamaConfig rejects it even with an explicit head_dim).
    """
    if not arch.is_uniform:
        return True
    return arch.family == "llama" and arch.hidden_size % arch.layers[0].num_heads != 0


def _rope_parameters(arch: Architecture) -> dict:
    params = {"rope_type": "default"}
    if arch.rope_scaling:
        params = dict(arch.rope_scaling)
        if "rope_type" not in params and "type" in params:  # older configs say "type"
            params["rope_type"] = params.pop("type")
    params["rope_theta"] = float(arch.rope_theta)
    return params


def hf_config(arch: Architecture, dtype: Optional[torch.dtype] = None):
    """The transformers config describing ``arch``: a stock Llama/Qwen2/Mistral config, or the
    project's per-layer config (see ``needs_remote_code``)."""
    kwargs = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        head_dim=arch.head_dim,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=max(l.num_heads for l in arch.layers),
        num_key_value_heads=max(l.num_kv_groups for l in arch.layers),
        intermediate_size=max(l.ffn_hidden_size for l in arch.layers),
        hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.rms_norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings,
        rope_parameters=_rope_parameters(arch),
        bos_token_id=arch.extra.get("bos_token_id"),
        eos_token_id=arch.extra.get("eos_token_id"),
        pad_token_id=arch.extra.get("pad_token_id"),
    )
    if arch.family == "llama":
        kwargs.update(attention_bias=False, mlp_bias=False)
    elif arch.family == "mistral":
        kwargs.update(sliding_window=arch.extra.get("sliding_window"))
    elif arch.family == "qwen2":
        kwargs.update(use_sliding_window=False)
    # Depth pruning leaves gaps in the source indices; stock configs carry them as extra keys,
    # which Architecture.from_hf_config reads back.
    trace = dict(
        source_layer_indices=[l.source_index for l in arch.layers],
        num_source_layers=arch.num_source_layers,
    )
    if needs_remote_code(arch):
        config = CONFIG_CLASSES[arch.family](
            **kwargs,
            **trace,
            effllm_family=arch.family,
            num_attention_heads_per_layer=[l.num_heads for l in arch.layers],
            num_key_value_heads_per_layer=[l.num_kv_groups for l in arch.layers],
            intermediate_size_per_layer=[l.ffn_hidden_size for l in arch.layers],
        )
        model_cls = MODEL_CLASSES[arch.family].__name__
        config.architectures = [model_cls]
        config.auto_map = {
            "AutoConfig": f"configuration_effllm.{type(config).__name__}",
            "AutoModelForCausalLM": f"modeling_effllm.{model_cls}",
        }
    else:
        stock = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                 "mistral": transformers.MistralConfig}[arch.family]
        if trace["source_layer_indices"] != list(range(arch.num_layers)) or (
            arch.num_source_layers != arch.num_layers
        ):
            kwargs.update(trace)
        config = stock(**kwargs)
        config.architectures = [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[
                arch.family
            ]
        ]
    if dtype is not None:
        config.dtype = dtype
    return config


def model_class(arch: Architecture):
    """The transformers causal-LM class for ``arch`` (stock, or the project's per-layer class)."""
    if needs_remote_code(arch):
        return MODEL_CLASSES[arch.family]
    return {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[arch.family]


# ---------------------------------------------------------------------------------- models
def build_hf_model(
    arch: Architecture,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    *,
    attn_implementation: Optional[str] = None,
):
    """An fp32, eval-mode transformers model for ``arch``, holding ``state_dict`` if given
    (checked strictly against ``arch``)."""
    config = hf_config(arch)
    cls = model_class(arch)
    kwargs = {"dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if state_dict is None:
        model = cls._from_config(config, **kwargs)
    else:
        sd = check_state_dict(arch, state_dict, "state dict")
        with no_init_weights():  # every parameter is overwritten below
            model = cls._from_config(config, **kwargs)
        model.tie_weights()  # skipped with the initialisation above
        result = model.load_state_dict(sd, strict=False)
        missing = set(result.missing_keys) - ({"lm_head.weight"} if arch.tie_word_embeddings else set())
        if missing or result.unexpected_keys:  # check_state_dict makes this unreachable
            raise RuntimeError(f"state dict does not fit the model: {missing} {result.unexpected_keys}")
    return model.float().eval()


def canonical_state_dict(model) -> dict[str, torch.Tensor]:
    """The canonical state dict (canonical order, tied lm_head dropped) of a transformers
    Llama-family model; the tensors are the model's own, detached."""
    arch = Architecture.from_hf_config(model.config.to_dict())
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    return check_state_dict(arch, tensors, type(model).__name__)


# ---------------------------------------------------------------------------------- loading
def load_hf_model(path: str, dtype: torch.dtype = torch.float32) -> HFSource:
    """Read a Hugging Face folder, a project export or a ``.gguf`` file (see module docstring)."""
    if not os.path.exists(path):
        raise UserError(
            f"model path {path} does not exist; pass a Hugging Face model folder "
            "(config.json + *.safetensors) or a .gguf file"
        )
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            return _load_gguf(path, dtype)
        raise UserError(
            f"{path} is a file but not a .gguf; pass the model folder (with config.json) or a .gguf file"
        )
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        ggufs = glob.glob(os.path.join(path, "*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype)
        raise UserError(
            f"{path} has no config.json; pass a Hugging Face model folder or the .gguf file itself"
        )
    arch = _arch_from_config_file(config_path)
    tensors = _read_weights(path, dtype)
    if tensors and not any(k.startswith("model.") for k in tensors):
        # saved from the base model (LlamaModel) rather than the causal LM
        tensors = {("model." + k if not k.startswith("lm_head.") else k): v for k, v in tensors.items()}
    state_dict = check_state_dict(arch, tensors, path)
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)
    return HFSource(arch, state_dict, path if has_tokenizer else None)


def _arch_from_config_file(config_path: str) -> Architecture:
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config_path} is not readable JSON ({err}); repair or re-export the model") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{config_path} holds a JSON {type(cfg).__name__}, not an object of model settings; "
                        "repair or re-export the model")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "unknown")
        raise UserError(
            f"{config_path}: {method}-quantized checkpoints are not supported; use the unquantized "
            "release of the model"
        )
    try:
        return Architecture.from_hf_config(cfg)
    except UserError as err:
        raise UserError(f"{config_path}: {err}") from None
    except KeyError as err:
        raise UserError(f"{config_path} lacks the field {err}; it is not a complete model config") from None
    except (TypeError, ValueError) as err:
        raise UserError(f"{config_path} has an invalid value ({err}); repair or re-export the model") from None


def _read_weights(folder: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    for index_name, reader in (
        ("model.safetensors.index.json", _read_safetensors),
        ("pytorch_model.bin.index.json", _read_torch_bin),
    ):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, AttributeError) as err:
                raise UserError(f"{index_path} is not a valid shard index ({err}); re-download or re-export") from None
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                shard_path = os.path.join(folder, shard)
                if not os.path.isfile(shard_path):
                    raise UserError(
                        f"{shard_path} is missing (listed in {index_name}); download every shard of the model"
                    )
                tensors.update(reader(shard_path, dtype))
            return tensors
    # model*.safetensors first: some repositories also ship other formats (consolidated.*)
    files = sorted(glob.glob(os.path.join(folder, "model*.safetensors"))) or sorted(
        glob.glob(os.path.join(folder, "*.safetensors"))
    )
    reader = _read_safetensors
    if not files:
        files = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        reader = _read_torch_bin
    if not files:
        raise UserError(
            f"{folder} has a config.json but no weights file (model.safetensors, "
            "model.safetensors.index.json or pytorch_model.bin); copy the weights next to it"
        )
    tensors = {}
    for path in files:
        tensors.update(reader(path, dtype))
    return tensors


def _read_safetensors(path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).to(dtype)
        return out
    except Exception as err:  # safetensors raises its own error types for damaged files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{path} is not a readable safetensors file ({reason}); it is truncated or corrupted: "
            "re-download or re-export it"
        ) from None


def _read_torch_bin(path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise UserError(
            f"{path} is not a readable PyTorch weights file ({type(err).__name__}); it is truncated, "
            "corrupted or not a plain state dict: re-download it or convert it to safetensors"
        ) from None
    return {k: v.to(dtype) for k, v in sd.items()}


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped), or a UserError for a damaged file."""
    try:
        return gguf.GGUFReader(path)
    except Exception as err:
        raise UserError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); re-download or re-export it"
        ) from None


def gguf_architecture(path: str) -> str:
    """``general.architecture`` of a GGUF file."""
    field = open_gguf(path).fields.get("general.architecture")
    if field is None:
        raise UserError(f"{path} has no general.architecture; it is not a model GGUF")
    return str(field.contents())


def _load_gguf(path: str, dtype: torch.dtype) -> HFSource:
    arch_name = gguf_architecture(path)
    if arch_name == "deci":
        raise UserError(
            f"{path} is a per-layer-width (deci) GGUF, which transformers cannot read; load the "
            "Hugging Face folder it was exported from"
        )
    if arch_name not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UserError(
            f"{path}: GGUF architecture {arch_name!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Llama-family decoders)"
        )
    folder, name = os.path.split(os.path.abspath(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:
        raise UserError(
            f"transformers could not load {path} ({type(err).__name__}: {err}); only GGUFs that "
            "transformers' GGUF loader reads are supported"
        ) from None
    try:
        arch = Architecture.from_hf_config(model.config.to_dict())
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    tensors = {k: v.to(dtype) for k, v in canonical_state_dict(model).items()}
    del model
    state_dict = check_state_dict(arch, tensors, path)
    return HFSource(arch, state_dict, _gguf_tokenizer_dir(path))


def _gguf_tokenizer_dir(path: str) -> str:
    """The GGUF's tokenizer as a normal HF tokenizer folder, converted once and cached."""
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.path.join(cache_dir(), "gguf-tokenizers")
    final = os.path.join(root, f"{os.path.basename(path)}-{key}")
    if os.path.isfile(os.path.join(final, "tokenizer_config.json")):
        return final
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:
        raise UserError(
            f"transformers could not read the tokenizer of {path} ({type(err).__name__}: {err})"
        ) from None
    tmp = f"{final}.partial-{uuid.uuid4().hex[:8]}"
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------- saving
def save_hf_model(
    arch: Architecture,
    state_dict: dict[str, torch.Tensor],
    out_dir: str,
    tokenizer_dir: Optional[str] = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> None:
    """Write a folder that ``AutoModelForCausalLM.from_pretrained`` loads (with
    ``trust_remote_code=True`` when ``needs_remote_code(arch)``).

    Written into a sibling temporary folder and renamed when complete (``output_dir.write_folder``):
    on failure nothing appears at ``out_dir``; ``overwrite`` replaces an existing folder only when
    this project wrote it, and only once the new one is complete.
    """
    arch.validate()
    sd = check_state_dict(arch, state_dict, "state dict to save")
    if tokenizer_dir is not None:
        tokenizer_files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]
        if not tokenizer_files:
            raise UserError(
                f"{tokenizer_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...); "
                "pass the folder of the source model's tokenizer"
            )
    with output_dir.write_folder(out_dir, kind="hf_model", overwrite=overwrite) as tmp:
        os.makedirs(tmp)
        config = hf_config(arch, dtype=dtype)
        config.save_pretrained(tmp)
        source_generation = os.path.join(tokenizer_dir or "", "generation_config.json")
        if tokenizer_dir is not None and os.path.isfile(source_generation):
            shutil.copyfile(source_generation, os.path.join(tmp, "generation_config.json"))
        else:
            GenerationConfig(
                bos_token_id=config.bos_token_id,
                eos_token_id=config.eos_token_id,
                pad_token_id=config.pad_token_id,
            ).save_pretrained(tmp)
        if needs_remote_code(arch):
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(os.path.join(HF_REMOTE_DIR, name), os.path.join(tmp, name))
        split = split_torch_state_dict_into_shards(
            sd, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
        for filename, names in split.filename_to_tensors.items():
            # A copy per shard: the caller's tensors may share storage (views of fused weights),
            # which safetensors refuses, and only one shard is held twice at a time.
            shard = {n: sd[n].detach().to("cpu", dtype).clone().contiguous() for n in names}
            safetensors.torch.save_file(shard, os.path.join(tmp, filename), metadata={"format": "pt"})
            del shard
        if split.is_sharded:
            total_size = sum(t.numel() for t in sd.values()) * (torch.finfo(dtype).bits // 8)
            index = {
                "metadata": {**split.metadata, "total_size": total_size},
                "weight_map": split.tensor_to_filename,
            }
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        if tokenizer_dir is not None:
            for name in tokenizer_files:
                shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
