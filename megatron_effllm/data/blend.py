"""Train / valid datasets from indexed prefixes, through megatron-core's dataset builders.

Two shapes, both made of megatron-core ``GPTDataset``s (samples of ``seq_len + 1`` tokens cut
across document boundaries, shuffled by megatron-core's seeded document/sample indices):

- ``build_blended_datasets``: several prefixes with fixed weights, blended by megatron-core's
  ``BlendedMegatronDatasetBuilder`` into a ``BlendedDataset`` (static mixture);
- ``build_domain_datasets``: one single-epoch ``GPTDataset`` per domain, for the dynamic batch
  sampler (which chooses the mixture itself) and for measuring each domain's held-out loss.

A sample is ``{"tokens", "labels", "loss_mask", "position_ids"}`` (each ``[seq_len]``); a
sample of ``build_blended_datasets`` also carries ``dataset_id``, one domain or many. Index files are cached under ``cache_dir`` (put it in
the run folder). When torch.distributed is initialised, megatron-core builds the indices on
rank 0 first and the other ranks load them after a barrier on the default group, so every
process must make the same calls.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import sysconfig
from collections import OrderedDict
from typing import Optional, Sequence, Union

import numpy

from megatron_effllm.cache import cache_dir
from megatron_effllm.data.preprocess import read_meta
from megatron_effllm.errors import UserError

Prefixes = Union[dict, Sequence[str]]


def ensure_dataset_helpers() -> None:
    """Make megatron-core's C++ index builders importable.

    megatron-core wheels ship them prebuilt (``helpers_cpp*.so``). Where they are missing (a
    source install), compile the shipped ``helpers.cpp`` once into the asset cache with g++ and
    pybind11 and register the module under its usual name; later calls reuse the build.
    """
    name = "megatron.core.datasets.helpers_cpp"
    if sys.modules.get(name) is not None:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    import megatron.core.datasets as mcd
    from filelock import FileLock

    src = os.path.join(os.path.dirname(mcd.__file__), "helpers.cpp")
    if not os.path.isfile(src):
        raise UserError("megatron-core's dataset helpers are neither built nor shipped as source; "
                        "reinstall megatron-core from a wheel (pip install megatron-core==0.16.1)")
    try:
        import pybind11
    except ImportError:
        raise UserError("megatron-core's dataset helpers need compiling and pybind11 is missing; "
                        "pip install pybind11 (and a C++ compiler)") from None
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read() + sys.version.encode()).hexdigest()[:16]
    out_dir = os.path.join(cache_dir(), "megatron_helpers", digest)
    os.makedirs(out_dir, exist_ok=True)
    so = os.path.join(out_dir, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    with FileLock(so + ".lock"):
        if not os.path.isfile(so):
            tmp = so + ".tmp"
            cmd = [os.environ.get("CXX", "g++"), "-O3", "-Wall", "-shared", "-std=c++11", "-fPIC",
                   f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                   src, "-o", tmp]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True)
            except FileNotFoundError:
                raise UserError("compiling megatron-core's dataset helpers needs g++; install a C++ "
                                "compiler or set CXX") from None
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"compiling megatron-core's dataset helpers failed ({last[:150]}); "
                                "check the C++ compiler and pybind11")
            os.replace(tmp, so)
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module


class TokenInfo:
    """The tokenizer facts megatron-core's ``GPTDatasetConfig`` reads (ids are pre-tokenized)."""

    def __init__(self, eod: int, vocab_size: int, name: str = "tokens"):
        self.eod = int(eod)
        self.vocab_size = int(vocab_size)
        self.name = name

    @property
    def unique_identifiers(self) -> OrderedDict:
        # Part of megatron-core's index cache key.
        return OrderedDict(name=self.name, eod=self.eod, vocab_size=self.vocab_size)

    def __repr__(self) -> str:
        return f"TokenInfo(eod={self.eod}, vocab_size={self.vocab_size}, name={self.name!r})"


def _as_dict(prefixes: Prefixes) -> dict:
    if isinstance(prefixes, dict):
        return dict(prefixes)
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    return {os.path.basename(p): p for p in prefixes}


def check_prefix(prefix: str, what: str = "dataset") -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not IndexedDataset.exists(prefix):
        raise UserError(f"{what} {prefix}: {prefix}.bin/.idx not found; run effllm-preprocess "
                        "to create it or fix the path")


def token_info_for(prefixes: Prefixes, eod_id: Optional[int] = None,
                   vocab_size: Optional[int] = None) -> TokenInfo:
    """The tokenizer facts shared by all ``prefixes`` (from their .meta.json), or the ones given.

    Prefixes tokenized by different tokenizers cannot be mixed: that is an error.
    """
    seen: dict = {}
    for domain, prefix in _as_dict(prefixes).items():
        meta = read_meta(prefix)
        if meta is None:
            continue
        tok = meta["tokenizer"]
        key = (tok["name"], tok["vocab_size"], tok["eos_id"])
        seen.setdefault(key, prefix)
    if len(seen) > 1:
        (a, pa), (b, pb) = list(seen.items())[:2]
        raise UserError(f"{pa} was tokenized with {a[0]} (vocab {a[1]}) but {pb} with {b[0]} "
                        f"(vocab {b[1]}); preprocess all data with the model's tokenizer")
    if seen:
        name, vocab, eos = next(iter(seen))
        if eod_id is not None and eod_id != eos:
            raise UserError(f"the data's end-of-document id is {eos} but {eod_id} was given; "
                            "preprocess again with the intended --eos-token")
        return TokenInfo(eos, vocab if vocab_size is None else vocab_size, name)
    if eod_id is None or vocab_size is None:
        raise UserError("the datasets have no .meta.json (not made by effllm-preprocess); "
                        "give eod_id and vocab_size of the tokenizer that made them")
    return TokenInfo(eod_id, vocab_size)


def gpt_config(seq_len: int, seed: int, cache_dir: Optional[str], tokens: TokenInfo,
               eod_mask_loss: bool = False, **blend):
    """megatron-core ``GPTDatasetConfig`` for plain left-to-right samples (no attention mask:
    the model applies its causal mask itself)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, path_to_cache=cache_dir, tokenizer=tokens,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
        create_attention_mask=False, **blend,
    )


def _builder_cls():
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    class Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            import torch.distributed as dist

            if cls is BlendedDataset and not dist.is_initialized() and args[-1].path_to_cache:
                # megatron-core 0.16.1's BlendedDataset asks torch.distributed for its rank on a
                # cache miss even in a single process; without a process group, build the
                # (cheap) blending index in memory instead of caching it.
                config = copy.copy(args[-1])
                config.path_to_cache = None
                args = (*args[:-1], config)
                blended_logger = logging.getLogger(BlendedDataset.__module__)
                level = blended_logger.level
                blended_logger.setLevel(logging.ERROR)  # its "cannot save" warning is expected
                try:
                    return BlendedMegatronDatasetBuilder.build_generic_dataset(
                        cls, is_built_on_rank, synchronize_ranks, *args)
                finally:
                    blended_logger.setLevel(level)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args)

    return Builder


def _split_ranges(split: Optional[str]):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    try:
        return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ZeroDivisionError, ValueError):
        raise UserError(f"split {split!r} must be up to three non-negative weights "
                        "train,valid,test (e.g. 98,2,0)") from None


def _check_enough_tokens(domain: str, prefix: str, split_matrix, seq_len: int) -> None:
    """Refuse a split that cannot make one sample (megatron-core would fail deep inside)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    # Copy: the lengths are a view into the index mmap, which closes with the dataset.
    lengths = numpy.array(ds.sequence_lengths)
    del ds
    n = len(lengths)
    for which, rng in zip(("train", "valid", "test"), split_matrix):
        if rng is None:
            continue
        beg, end = int(round(rng[0] * n)), int(round(rng[1] * n))
        tokens = int(lengths[beg:end].sum())
        if tokens < seq_len + 1:
            raise UserError(
                f"domain {domain} ({prefix}): its {which} split holds {end - beg} documents, "
                f"{tokens} tokens, fewer than one sample of seq_len+1 = {seq_len + 1}; add data, "
                "lower seq_len or change the split"
            )


def build_blended_datasets(train: Prefixes, weights: Optional[Sequence[float]], seq_len: int,
                           seed: int, cache_dir: Optional[str],
                           num_samples: Sequence[Optional[int]] = (None, None, None),
                           valid: Optional[Prefixes] = None, split: str = "98,2,0",
                           tokens: Optional[TokenInfo] = None, eod_mask_loss: bool = False):
    """(train, valid, test) datasets blending ``train`` prefixes by ``weights``.

    ``num_samples`` is the number of samples wanted per split (required for a split with
    weights; megatron-core repeats epochs of a prefix as needed). With ``valid`` prefixes the
    valid split comes from them (blended by their token counts) and all of ``train`` is for
    training; without, each prefix is divided by documents according to ``split``.
    Returns megatron-core ``BlendedDataset``s (``OneDomainBlend`` where megatron-core builds a
    lone ``GPTDataset``), None for a split that is not built; every sample has a ``dataset_id``.
    """
    ensure_dataset_helpers()
    from megatron.core.datasets.gpt_dataset import GPTDataset

    train = _as_dict(train)
    if not train:
        raise UserError("no training datasets given")
    for d, p in train.items():
        check_prefix(p, f"domain {d}")
    prefixes = list(train.values())
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(prefixes):
            raise UserError(f"{len(weights)} weights for {len(prefixes)} datasets; give one "
                            "weight per dataset")
        if any(not w > 0 for w in weights):
            raise UserError(f"blend weights must be positive, got {weights}")
    all_prefixes = dict(train)
    if valid is not None:
        valid = _as_dict(valid)
        for d, p in valid.items():
            check_prefix(p, f"held-out domain {d}")
        all_prefixes.update({f"{d} (held-out)": p for d, p in valid.items()})
    tokens = tokens or token_info_for(all_prefixes)
    sizes = list(num_samples) + [None] * (3 - len(num_samples))
    if valid is None:
        matrix = _split_ranges(split)
        for d, p in train.items():
            _check_enough_tokens(d, p, matrix, seq_len)
        blend = {"blend": (prefixes, weights), "split": split}
    else:
        for d, p in train.items():
            _check_enough_tokens(d, p, [(0.0, 1.0), None, None], seq_len)
        for d, p in valid.items():
            _check_enough_tokens(d, p, [None, (0.0, 1.0), None], seq_len)
        blend = {"blend_per_split": [(prefixes, weights), (list(valid.values()), None), None]}
        sizes[2] = None
    if weights is not None:
        built = matrix if valid is None else [(0.0, 1.0), None, None]
        for i, which in enumerate(("training", "validation", "test")):
            if sizes[i] is None and built[i] is None:
                sizes[i] = 0  # megatron-core wants a size for every split of a weighted blend
            elif sizes[i] is None and (valid is None or i == 0):
                raise UserError(f"blending by weights needs the number of {which} samples "
                                f"(num_samples[{i}], e.g. steps * global_batch for training)")
    config = gpt_config(seq_len, seed, cache_dir, tokens, eod_mask_loss, **blend)
    built = _builder_cls()(GPTDataset, sizes, lambda: True, config).build()
    return tuple(OneDomainBlend(ds) if isinstance(ds, GPTDataset) else ds for ds in built)


class OneDomainBlend:
    """A blend of one prefix. megatron-core skips ``BlendedDataset`` for a single prefix (always
    for a split given by its own files, ``blend_per_split``) and returns the bare ``GPTDataset``,
    whose samples lack the ``dataset_id`` a blend's samples carry; this adds it (domain 0)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        return {"dataset_id": 0, **self.dataset[idx]}


def build_domain_datasets(prefixes: Prefixes, seq_len: int, seed: int, cache_dir: Optional[str],
                          split: str = "100,0,0", tokens: Optional[TokenInfo] = None,
                          eod_mask_loss: bool = False) -> dict:
    """{domain: (train, valid, test)}: one single-epoch ``GPTDataset`` per domain and split.

    ``split`` divides each domain's documents (``"100,0,0"``: all for training; ``"0,1,0"``:
    a held-out file used whole for validation). A split with weight 0 is None.
    """
    ensure_dataset_helpers()
    from megatron.core.datasets.gpt_dataset import GPTDataset

    prefixes = _as_dict(prefixes)
    if not prefixes:
        raise UserError("no datasets given")
    for d, p in prefixes.items():
        check_prefix(p, f"domain {d}")
    tokens = tokens or token_info_for(prefixes)
    matrix = _split_ranges(split)
    out = {}
    for domain, prefix in prefixes.items():
        _check_enough_tokens(domain, prefix, matrix, seq_len)
        config = gpt_config(seq_len, seed, cache_dir, tokens, eod_mask_loss,
                            blend=([prefix], None), split=split)
        out[domain] = tuple(_builder_cls()(GPTDataset, [None, None, None], lambda: True,
                                           config).build())
    return out


def describe(prefixes: Prefixes) -> dict:
    """{domain: {"prefix", "documents", "tokens"}} read from the indices (cheap: mmap)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = {}
    for d, p in _as_dict(prefixes).items():
        check_prefix(p, f"domain {d}")
        ds = IndexedDataset(p)
        out[d] = {"prefix": p, "documents": len(ds), "tokens": int(ds.sequence_lengths.sum())}
    return out

