"""Load a causal LM and its tokenizer for evaluation: a Hugging Face folder (stock or
``trust_remote_code``) or a ``.gguf`` file read through transformers' GGUF loader."""
from __future__ import annotations

import json
import os

from megatron_effllm.errors import UserError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available; use --device cpu")
    return dev


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def check_model_path(path: str, trust_remote_code: bool = False) -> tuple[str, dict]:
    """(folder, extra from_pretrained kwargs) for a model folder or .gguf file, or a UserError."""
    if not os.path.exists(path):
        raise UserError(f"model {path} not found; pass a Hugging Face model folder or a .gguf file")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise UserError(f"{path} is a file but not a .gguf; pass a Hugging Face model folder or a .gguf file")
        folder, name = os.path.split(os.path.abspath(path))
        kwargs = {"gguf_file": name}
    else:
        folder, kwargs = path, {}
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise UserError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
        try:
            with open(config) as f:
                auto_map = json.load(f).get("auto_map")
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{config} is not readable JSON ({_one_line(err)}); re-export the model") from None
        if auto_map and not trust_remote_code:
            raise UserError(f"{path} ships its own model code (auto_map in config.json); "
                            "pass --trust-remote-code to load it")
    return folder, kwargs


def load_causal_lm(path: str, dtype: str = "fp32", trust_remote_code: bool = False, device: str = "auto"):
    """(model in eval mode on ``device``, tokenizer) from a folder or a .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    folder, kwargs = check_model_path(path, trust_remote_code)
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        raise UserError(f"could not load a tokenizer from {path} ({_one_line(err)}); "
                        "the folder needs tokenizer files (tokenizer.json or tokenizer.model)") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, DTYPES[dtype]),
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        raise UserError(f"transformers could not load the model in {path} ({_one_line(err)})") from None
    return model.to(dev).eval(), tokenizer
