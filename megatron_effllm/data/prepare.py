"""Resolving the run configuration's ``data`` section into ``DataArgs``: builtin samples,
``.domains.json`` manifests, indexed prefixes or raw files per domain, tokenized once (rank 0
first) and merged per domain, so that ``data.loader`` only iterates finished indexed datasets.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Mapping, Optional

from megatron_effllm.assets import corpus_files
from megatron_effllm.data.loader import DataArgs
from megatron_effllm.data.preprocess import inputs_fingerprint, preprocess, read_meta
from megatron_effllm.data.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer_path
from megatron_effllm.errors import UserError
from megatron_effllm.parallel import comm


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"domain manifest {path} is unreadable ({err}); give the .domains.json "
                        "written by effllm-preprocess --split-by-domain") from None
    if not isinstance(manifest, dict) or not manifest:
        raise UserError(f"domain manifest {path} must map domain names to prefixes")
    return manifest


def _is_prefix(entry: str) -> bool:
    return os.path.isfile(entry + ".bin") and os.path.isfile(entry + ".idx")


def check_indexed(prefix: str) -> None:
    """Refuse an indexed dataset whose .idx does not read or whose .bin is shorter than the
    index says (a copy cut short): megatron-core would fail mid-training on the missing tokens."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        index = _IndexReader(prefix + ".idx", False)
        need = (int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
                if len(index.sequence_lengths) else 0)
        del index
    except (AssertionError, ValueError, OSError, KeyError, struct.error) as err:
        raise UserError(f"{prefix}.idx is not a readable megatron index ({type(err).__name__}); copy it again "
                        "or rebuild the data with effllm-preprocess") from None
    size = os.path.getsize(prefix + ".bin")
    if size < need:
        raise UserError(f"{prefix}.bin is truncated: {size:,} bytes, but {prefix}.idx describes {need:,}; "
                        "copy it again or rebuild the data with effllm-preprocess")


def _is_whole(prefix: str) -> bool:
    """Whether a cached tokenization is intact (a damaged one is tokenized again)."""
    try:
        check_indexed(prefix)
    except UserError:
        return False
    return True


def _normalize_spec(spec, split: str) -> dict:
    """Config value -> {domain: [entries]} (entries: raw inputs or indexed prefixes)."""
    if spec in (None, ""):
        return {}
    if spec == "builtin":
        return {d: [p] for d, p in corpus_files("train" if split == "train" else "heldout").items()}
    if isinstance(spec, str):
        if spec.endswith(".json"):
            return {d: [p] for d, p in _read_manifest(spec).items()}
        if _is_prefix(spec):
            return {os.path.basename(spec): [spec]}
        raise UserError(f"data.{split}: {spec!r} is neither 'builtin', a .domains.json manifest "
                        "nor an indexed prefix; or give a mapping domain -> files")
    if isinstance(spec, Mapping):
        out = {}
        for d, entries in spec.items():
            entries = [entries] if isinstance(entries, str) else list(entries or [])
            if not entries:
                raise UserError(f"data.{split}.{d}: no files given")
            out[str(d)] = [str(e) for e in entries]
        return out
    raise UserError(f"data.{split} must be 'builtin', a manifest path or a mapping domain -> files")


class _TokenizerOnce:
    """The tokenizer for raw inputs, loaded only if some domain needs tokenizing."""

    def __init__(self, tokenizer, eos_token: Optional[str]):
        self._tok = tokenizer if isinstance(tokenizer, Tokenizer) else None
        self.spec, self.eos_token = tokenizer, eos_token

    def source(self) -> tuple:
        """(path, eos_token) that identify the tokenizer without loading it."""
        if self._tok is not None:
            return self._tok.path, self._tok.eos_token
        if self.spec is None:
            raise UserError("raw data inputs need the model's tokenizer; give a tokenizer path")
        return resolve_tokenizer_path(self.spec), self.eos_token

    def get(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.spec, self.eos_token)
        return self._tok


def _resolve_domain(domain: str, entries: list, tokenizer: _TokenizerOnce, out_prefix: str,
                    progress: bool) -> str:
    prefixes = [e for e in entries if _is_prefix(e)]
    if prefixes and len(prefixes) == len(entries):
        for p in prefixes:
            check_indexed(p)
        return prefixes[0] if len(prefixes) == 1 else _merge_prefixes(prefixes, out_prefix)
    if prefixes:
        raise UserError(f"domain {domain} mixes indexed prefixes and raw files; give one kind")
    meta = read_meta(out_prefix) if _is_prefix(out_prefix) else None
    if meta is not None and meta.get("inputs") == inputs_fingerprint(entries):
        made_by = meta["tokenizer"]
        if (made_by.get("path"), made_by.get("eos_token")) == tokenizer.source() and _is_whole(out_prefix):
            return out_prefix  # already tokenized from the same files by the same tokenizer
    preprocess(entries, tokenizer.get(), out_prefix, progress=progress)
    return out_prefix


def _merge_prefixes(prefixes: list, out_prefix: str) -> str:
    """Concatenate several indexed prefixes of one domain (megatron-core ``add_index``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader

    fingerprint = [{"prefix": os.path.abspath(p), "size": os.path.getsize(p + ".bin"),
                    "mtime_ns": os.stat(p + ".bin").st_mtime_ns} for p in prefixes]
    meta = read_meta(out_prefix) if _is_prefix(out_prefix) else None
    if meta is not None and meta.get("inputs") == fingerprint:
        return out_prefix
    metas = [read_meta(p) for p in prefixes]
    dtypes = {str(_IndexReader(p + ".idx", False).dtype) for p in prefixes}
    if len(dtypes) > 1:
        raise UserError(f"prefixes {', '.join(prefixes)} store tokens as {', '.join(sorted(dtypes))}; "
                        "merge only data from one tokenizer")
    toks = {json.dumps(m["tokenizer"], sort_keys=True) for m in metas if m}
    if len(toks) > 1:
        raise UserError(f"prefixes {', '.join(prefixes)} come from different tokenizers")
    reader = _IndexReader(prefixes[0] + ".idx", False)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(out_prefix + ".bin.tmp", dtype=reader.dtype)
    del reader
    try:
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(out_prefix + ".idx.tmp")
        base = next((m for m in metas if m), None)
        merged = dict(base or {"format": "megatron_effllm.indexed/1"}, inputs=fingerprint,
                      documents=sum((m or {}).get("documents", 0) for m in metas),
                      tokens=sum((m or {}).get("tokens", 0) for m in metas))
        with open(out_prefix + ".meta.json.tmp", "w") as f:
            json.dump(merged, f, indent=1)
        for ext in (".bin", ".idx", ".meta.json"):
            os.replace(out_prefix + ext + ".tmp", out_prefix + ext)
    except BaseException:
        for ext in (".bin", ".idx", ".meta.json"):
            if os.path.exists(out_prefix + ext + ".tmp"):
                os.remove(out_prefix + ext + ".tmp")
        raise
    return out_prefix


def _on_rank_zero_first(fn):
    """Run ``fn`` on global rank 0, then on the others (they find its outputs cached)."""
    first = comm.global_rank() == 0
    result = fn() if first else None
    comm.barrier()
    if not first:
        result = fn()
    return result


def prepare_data(data_cfg, tokenizer, out_dir: str, seed: int = 1234,
                 train_samples: Optional[int] = None, eos_token: Optional[str] = None,
                 progress: bool = True) -> DataArgs:
    """Resolve the run configuration's ``data`` section into ``DataArgs``.

    ``data_cfg.train`` / ``data_cfg.heldout``: ``"builtin"`` (the corpus sample shipped with the
    package), the ``.domains.json`` manifest of ``effllm-preprocess --split-by-domain``,
    an indexed prefix, or a mapping domain -> files/folders (jsonl, parquet, HF datasets) or
    indexed prefixes. Raw inputs are tokenized with ``tokenizer`` (a path accepted by
    ``load_tokenizer``, or a loaded ``Tokenizer``; ``eos_token`` or ``data_cfg.eos_token``
    chooses the document separator) into ``out_dir/<train|heldout>/<domain>``, once: unchanged
    inputs with the same tokenizer are not tokenized again. Index caches go to ``out_dir/index_cache``.
    Other fields read from ``data_cfg`` (when present): weights, seq_len, dynamic,
    dynamic_interval, dynamic_eta, dynamic_smoothing, dynamic_signed, reference_losses (a
    mapping; any other value is left to the caller, e.g. "source" = measure it), split,
    eod_mask_loss.
    """
    get = (lambda k, default=None: data_cfg.get(k, default)) if isinstance(data_cfg, Mapping) \
        else (lambda k, default=None: getattr(data_cfg, k, default))
    train_spec = _normalize_spec(get("train", "builtin"), "train")
    heldout_spec = _normalize_spec(get("heldout"), "heldout")
    if not train_spec:
        raise UserError("data.train is empty; give 'builtin', a manifest or domain -> files")

    tok = _TokenizerOnce(tokenizer, eos_token if eos_token is not None else get("eos_token"))

    def resolve():
        train = {d: _resolve_domain(d, e, tok, os.path.join(out_dir, "train", d), progress)
                 for d, e in train_spec.items()}
        heldout = {d: _resolve_domain(d, e, tok, os.path.join(out_dir, "heldout", d), progress)
                   for d, e in heldout_spec.items()}
        return train, heldout

    train, heldout = _on_rank_zero_first(resolve)
    unknown = [d for d in heldout if d not in train]
    if unknown:
        raise UserError(f"held-out domains {', '.join(unknown)} have no training data; name the "
                        "same domains in data.train and data.heldout")
    reference = get("reference_losses")
    weights = get("weights")
    return DataArgs(
        train=train, heldout=heldout or None,
        weights=dict(weights) if weights else None,
        seq_len=int(get("seq_len", get("seq_length", 256))), seed=seed,
        cache_dir=os.path.join(out_dir, "index_cache"), split=get("split", "98,2,0"),
        train_samples=train_samples, eod_mask_loss=bool(get("eod_mask_loss", False)),
        dynamic=bool(get("dynamic", False)), dynamic_interval=int(get("dynamic_interval", 50)),
        dynamic_eta=float(get("dynamic_eta", 1.0)),
        dynamic_smoothing=float(get("dynamic_smoothing", 1e-4)),
        dynamic_signed=bool(get("dynamic_signed", False)),
        reference_losses=dict(reference) if isinstance(reference, Mapping) else None,
    )
