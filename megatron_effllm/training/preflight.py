"""Checks of a run's inputs against each other, made before any training work starts.

Each check raises a UserError with one line naming the mismatch and the fix; a run that passes
them cannot fail later for these reasons (mid-run, after hours, or with a deep traceback).
"""
from __future__ import annotations

import os

from megatron_effllm.architecture import Architecture, LayerShape
from megatron_effllm.data.preprocess import read_meta
from megatron_effllm.data.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer_path
from megatron_effllm.errors import UserError


def floor_params(arch: Architecture, prune_cfg, tensor_parallel: int = 1) -> int:
    """A lower bound on the parameter count any pruning of ``arch`` under the config's floors
    can reach: every layer at its floor (at least one KV group, ``min_heads_per_group`` query
    heads, ``min_ffn`` channels), the hidden size at 1 when it may shrink, one layer when whole
    layers may go."""
    tp = max(1, tensor_parallel)
    heads = max(1, prune_cfg.min_heads_per_group, tp)
    ffn = max(1, prune_cfg.min_ffn, tp)
    layers = [LayerShape(min(l.num_heads, heads), min(l.num_kv_groups, tp), min(l.ffn_hidden_size, ffn),
                         l.source_index) for l in arch.layers]
    if prune_cfg.allow_depth:
        layers = [min(layers, key=arch.layer_params)]
    hidden = 1 if prune_cfg.prune_hidden else arch.hidden_size
    smallest = arch.replace(hidden_size=hidden, layers=tuple(layers))
    return smallest.num_params()


def check_prune_target(cfg, arch: Architecture, target: int) -> None:
    """The target must lie between the floors and the source size."""
    p = cfg.prune
    if p.strategy == "none":
        return
    floor = floor_params(arch, p, cfg.parallel.tp)
    if target < floor:
        raise UserError(
            f"prune.target_params {p.target_params:g} ({target:,} parameters) is below the {floor:,} "
            f"that the floors allow (prune.min_heads_per_group={p.min_heads_per_group}, "
            f"prune.min_ffn={p.min_ffn}, prune.prune_hidden={str(p.prune_hidden).lower()}, "
            f"prune.allow_depth={str(p.allow_depth).lower()}); raise the target or lower the floors"
        )


def check_data_tokens(data_args, arch: Architecture, tokenizer_spec, eos_token=None) -> None:
    """The token ids of the prepared data must come from the model's tokenizer.

    Ids past the embedding table fail deep inside the model; ids from another tokenizer of
    another size train silently on garbage.
    """
    prefixes = dict(data_args.train)
    prefixes.update({f"{d} (held-out)": p for d, p in (data_args.heldout or {}).items()})
    foreign = []
    for domain, prefix in prefixes.items():
        meta = read_meta(prefix)
        if meta is None:
            continue
        tok = meta["tokenizer"]
        if int(tok["vocab_size"]) > arch.vocab_size:
            raise UserError(
                f"data {prefix} was tokenized with {tok['name']} ({tok['vocab_size']:,} tokens) but "
                f"the model's vocabulary has {arch.vocab_size:,}; use the model's tokenizer "
                "(model.tokenizer, or the source model's) or a model with a matching vocab_size"
            )
        foreign.append((prefix, tok))
    if not foreign or tokenizer_spec is None:
        return
    if isinstance(tokenizer_spec, Tokenizer):
        run_tok = tokenizer_spec
    else:
        own_path = resolve_tokenizer_path(str(tokenizer_spec))
        if all(os.path.abspath(str(t.get("path"))) == os.path.abspath(own_path) for _, t in foreign):
            return  # tokenized in this run or by the same tokenizer file
        run_tok = load_tokenizer(str(tokenizer_spec), eos_token)
    for prefix, tok in foreign:
        if int(tok["vocab_size"]) != run_tok.vocab_size:
            raise UserError(
                f"data {prefix} was tokenized with {tok['name']} ({tok['vocab_size']:,} tokens) but "
                f"the model's tokenizer {run_tok.name} has {run_tok.vocab_size:,}; preprocess the data "
                "again with the model's tokenizer (effllm-preprocess --tokenizer ...)"
            )


def check_tensor_parallel(cfg, arch: Architecture) -> None:
    """Every width tensor parallelism splits must divide by parallel.tp (KV groups, query heads,
    FFN widths, the vocabulary): one line, before any expensive work."""
    tp = cfg.parallel.tp
    if tp == 1:
        return
    if arch.vocab_size % tp:
        raise UserError(f"parallel.tp={tp} does not divide the vocabulary size {arch.vocab_size}; choose a "
                        "TP size that divides it")
    try:
        arch.validate(tensor_parallel=tp)
    except UserError as err:
        raise UserError(f"parallel.tp={tp}: {err}") from None
