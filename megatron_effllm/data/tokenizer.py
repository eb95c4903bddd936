"""The source model's tokenizer behind one small interface.

    tok = load_tokenizer("path/to/model.gguf")      # or an HF folder, or a sentencepiece .model
    ids = tok.encode("some text")                    # no special tokens added
    tok.eos_id, tok.vocab_size, tok.name

Accepted sources:
- an HF tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``): ``AutoTokenizer``;
- a ``.gguf`` file: its embedded tokenizer, through ``AutoTokenizer(dir, gguf_file=name)``;
- a sentencepiece ``.model`` file: ``sentencepiece.SentencePieceProcessor``;
- ``smollm2-135m``: the SmolLM2 GGUF fetched by ``megatron_effllm.assets``;
- any other string: a model-hub id, passed to ``AutoTokenizer`` (needs network access).

``encode`` never adds BOS/EOS: preprocessing decides what goes around a document. The
document separator is the tokenizer's EOS unless ``eos_token`` names another token (an
instruct model's EOS is often its chat end-of-turn, not the end-of-text its pretraining used).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from megatron_effllm.assets import smollm2_gguf
from megatron_effllm.errors import UserError

BUILTIN_ALIASES = ("smollm2-135m",)


class Tokenizer:
    """encode(text) -> ids, eos_id, vocab_size, name; built by ``load_tokenizer``."""

    kind: str = ""
    eos_token: Optional[str] = None  # the separator requested by name, None for the default EOS

    def __init__(self, path: str, name: str, eos_id: int, vocab_size: int,
                 bos_id: Optional[int] = None):
        self.path = path
        self.name = name
        self.eos_id = int(eos_id)
        self.vocab_size = int(vocab_size)
        self.bos_id = None if bos_id is None else int(bos_id)
        if not 0 <= self.eos_id < self.vocab_size:
            raise UserError(
                f"tokenizer {name}: end-of-document id {self.eos_id} is outside the vocabulary "
                f"(size {self.vocab_size}); pass eos_token with a token that exists"
            )

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def identity(self) -> dict:
        """What makes token ids produced by this tokenizer comparable (stored with the data)."""
        return {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "path": self.path, "eos_token": self.eos_token}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id})")


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, hf, path: str, name: str, eos_token: Optional[str] = None):
        self.hf = hf
        # Documents are tokenized whole; silence the "longer than model_max_length" warning.
        hf.model_max_length = int(1e30)
        eos_id = self._resolve_eos(hf, name, eos_token)
        super().__init__(path, name, eos_id, len(hf), hf.bos_token_id)

    @staticmethod
    def _resolve_eos(hf, name: str, eos_token: Optional[str]) -> int:
        if eos_token is not None:
            tid = hf.convert_tokens_to_ids(eos_token)
            if tid is None or (tid == hf.unk_token_id and eos_token != hf.unk_token):
                raise UserError(f"tokenizer {name} has no token {eos_token!r}; pass an "
                                "eos_token that is in its vocabulary")
            return tid
        if hf.eos_token_id is None:
            raise UserError(f"tokenizer {name} defines no end-of-sequence token; pass eos_token "
                            "(e.g. --eos-token '</s>') to choose the document separator")
        return hf.eos_token_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = self.hf(list(texts), add_special_tokens=False, return_attention_mask=False,
                      verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))

    def token_to_id(self, token: str) -> Optional[int]:
        tid = self.hf.convert_tokens_to_ids(token)
        if tid is None or (tid == self.hf.unk_token_id and token != self.hf.unk_token):
            return None
        return tid


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, sp, path: str, name: str, eos_token: Optional[str] = None):
        self.sp = sp
        if eos_token is not None:
            eos_id = sp.piece_to_id(eos_token)
            if eos_id == sp.unk_id() and eos_token != sp.id_to_piece(sp.unk_id()):
                raise UserError(f"sentencepiece model {name} has no piece {eos_token!r}; pass an "
                                "eos_token that is in its vocabulary")
        else:
            eos_id = sp.eos_id()
            if eos_id < 0:
                raise UserError(f"sentencepiece model {name} was trained without an EOS piece; "
                                "pass eos_token to choose the document separator")
        bos = sp.bos_id()
        super().__init__(path, name, eos_id, sp.get_piece_size(), bos if bos >= 0 else None)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def token_to_id(self, token: str) -> Optional[int]:
        tid = self.sp.piece_to_id(token)
        return None if tid == self.sp.unk_id() and token != self.sp.id_to_piece(tid) else tid


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _load_hf(source: str, path: str, name: str, eos_token: Optional[str], **kwargs) -> HFTokenizer:
    _quiet_transformers()
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load a tokenizer from {name} ({first[:200]}); give an HF "
                        "tokenizer folder, a .gguf file or a sentencepiece .model") from None
    return HFTokenizer(hf, path, name, eos_token)


_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_tokenizer_path(path: str) -> str:
    """The file or folder ``load_tokenizer(path)`` reads (absolute), or ``path`` for a hub id."""
    if not path:
        raise UserError("no tokenizer given; pass --tokenizer with an HF folder, a .gguf file "
                        "or a sentencepiece .model")
    if path in BUILTIN_ALIASES:
        return smollm2_gguf()
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in _HF_FILES):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return os.path.abspath(os.path.join(path, ggufs[0]))
            raise UserError(f"tokenizer folder {path} has no tokenizer.json or "
                            "tokenizer_config.json; point --tokenizer at an HF model folder, a "
                            ".gguf file or a sentencepiece .model")
        return os.path.abspath(path)
    if os.path.isfile(path):
        if os.path.basename(path) in ("tokenizer.json", "tokenizer_config.json"):
            return os.path.dirname(os.path.abspath(path))
        return os.path.abspath(path)
    is_hub_id = (path.count("/") == 1 and not path.startswith((".", "/", "~"))
                 and not path.endswith((".gguf", ".model", ".json")))
    if not is_hub_id:
        raise UserError(f"tokenizer {path} not found; give an existing HF tokenizer folder, "
                        ".gguf file or sentencepiece .model (or smollm2-135m)")
    return path  # "org/name": a model-hub id; works only with network access


def load_tokenizer(path: str, eos_token: Optional[str] = None) -> Tokenizer:
    """Load the tokenizer at ``path`` (see the module docstring for what is accepted)."""
    path = resolve_tokenizer_path(path)
    base = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        tok = _load_hf(path, path, base, eos_token)
    elif not os.path.exists(path):
        tok = _load_hf(path, path, path, eos_token)
    elif base.endswith(".gguf"):
        try:
            import gguf  # noqa: F401  (transformers reads GGUF through it)
        except ImportError:
            raise UserError("reading a .gguf tokenizer needs the gguf package; "
                            "pip install gguf") from None
        tok = _load_hf(os.path.dirname(path), path, base, eos_token, gguf_file=base)
    elif base.endswith(".model"):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.load(path)
        except (OSError, RuntimeError) as err:
            raise UserError(f"{path} is not a sentencepiece model ({str(err).strip()[:120]}); "
                            "give a sentencepiece .model file") from None
        tok = SentencePieceTokenizer(sp, path, base, eos_token)
    else:
        raise UserError(f"tokenizer file {path} has an unknown type; give an HF tokenizer folder, "
                        "a .gguf file or a sentencepiece .model")
    tok.eos_token = eos_token
    return tok


def save_hf_tokenizer(path: str, out_dir: str, model_max_length: Optional[int] = None) -> bool:
    """Write HF tokenizer files for tokenizer ``path`` into ``out_dir`` (an exported model folder),
    for any source AutoTokenizer reads (HF folder, .gguf, smollm2-135m, hub id). False for a
    sentencepiece .model (no HF tokenizer class is implied by it)."""
    tok = load_tokenizer(path)
    if not isinstance(tok, HFTokenizer):
        return False
    if model_max_length:
        tok.hf.model_max_length = model_max_length  # not the "unbounded" value set for tokenizing
    tok.hf.save_pretrained(out_dir)
    return True
