"""Decode latency per prunable group, measured once for a target runtime and shape.

``prune.cost: latency`` makes the global ranking trade saliency per second of batch-1 decode
saved instead of per parameter. The table holds seconds per generated token of one unit of each
kind at the source shape: a query head, a KV group's own projections, an FFN channel, a hidden
channel (every layer's projections, the norms and the lm_head over the vocabulary), and the
fixed part of a layer (norms, rope, residuals, kernel launches: what does not shrink with width).

It is measured by differences: the same model at the source shape and with one kind shrunk in
every layer (random weights: speed does not depend on values), timed side by side, best of
several rounds. The table is a JSON file stored with the run and reused via its path; the
selector only reads numbers from it, so selection is the same on every process.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from megatron_effllm.architecture import Architecture
from megatron_effllm.errors import UserError

KINDS = ("head", "kv", "ffn", "hidden", "layer")
RUNTIMES = ("transformers",)
FLOOR_S = 1e-12  # a measured difference lost in noise still costs something (keeps ratios finite)


@dataclass(frozen=True)
class LatencyTable:
    """Seconds per generated token saved by removing one unit of each kind (see module doc)."""

    runtime: str
    head: float
    kv: float
    ffn: float
    hidden: float
    layer: float  # the fixed part only; a layer's total is layer + its heads, groups and channels
    total: float  # the source's seconds per token (for reports)
    shape: str = ""  # the architecture it was measured on (widths_summary of the source)
    threads: int = 0

    def __post_init__(self):
        for k in KINDS + ("total",):
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and v == v and 0 <= v < float("inf")):
                raise UserError(f"latency table: {k} must be a finite number >= 0 seconds, got {v!r}; "
                                "measure it again (python -m megatron_effllm.pruning.latency)")

    def unit(self, kind: str) -> float:
        """Seconds for one unit of ``kind``, never zero."""
        return max(float(getattr(self, kind)), FLOOR_S)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        if not os.path.isfile(path):
            raise UserError(f"latency table {path} does not exist; measure one with "
                            "python -m megatron_effllm.pruning.latency --model MODEL --out PATH")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"latency table {path} is not readable JSON ({e}); measure it again") from None
        need = set(KINDS) | {"runtime", "total"}
        if not isinstance(data, dict) or not need <= set(data):
            raise UserError(f"latency table {path} lacks {sorted(need - set(data or {}))}; measure it again")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def from_timings(arch: Architecture, t: dict, runtime: str = "transformers", threads: int = 0) -> LatencyTable:
    """The table from seconds per token of the variants ``measure_variants`` builds (pure arithmetic).

    t: seconds per token of each name in ``variants`` (the source and one kind shrunk in every
    layer); a unit's latency is the difference to the source over the units removed.
    """
    v = variants(arch)
    L = arch.num_layers
    s = arch.layers[0]

    def saved(name):  # a smaller model that is not faster: the timings are noise, not a cost
        d = t["base"] - t[name]
        if d <= 0 and not (name == "head" and s.heads_per_group == 1):
            raise UserError(f"latency table: the model with smaller {name} widths was not faster "
                            f"({1e3 * t[name]:.2f} vs {1e3 * t['base']:.2f} ms per token); the machine is too busy "
                            "to measure: run it again on a quiet machine or with more --rounds")
        return max(d, 0.0)

    ffn = saved("ffn") / (L * (s.ffn_hidden_size - v["ffn"]["ffn"]))
    head = saved("head") / (L * s.num_kv_groups)
    kv_gone = s.num_kv_groups - v["kv"]["kv"]
    kv = max(0.0, saved("kv") / (L * kv_gone) - s.heads_per_group * head)
    hidden = saved("hidden") / (arch.hidden_size - v["hidden"]["hidden"])
    per_layer = saved("layer") / (L - v["layer"]["layers"])
    fixed = max(0.0, per_layer - s.num_heads * head - s.num_kv_groups * kv - s.ffn_hidden_size * ffn)
    return LatencyTable(runtime=runtime, head=head, kv=kv, ffn=ffn, hidden=hidden, layer=fixed, total=t["base"],
                        shape=arch.widths_summary()[:200], threads=threads)


def variants(arch: Architecture) -> dict:
    """name -> (layers, hidden, heads, kv, ffn) of the uniform models timed against the source."""
    s = arch.layers[0]
    if any(l.widths != s.widths for l in arch.layers):
        raise UserError("the latency table is measured on a model with equal layers (the source); "
                        "give the unpruned source model")
    base = {"layers": arch.num_layers, "hidden": arch.hidden_size, "heads": s.num_heads,
            "kv": s.num_kv_groups, "ffn": s.ffn_hidden_size}
    hpg = s.heads_per_group
    out = {"base": base}
    out["ffn"] = {**base, "ffn": max(1, s.ffn_hidden_size // 2)}
    if hpg > 1:
        out["head"] = {**base, "heads": s.num_heads - s.num_kv_groups}
    out["kv"] = {**base, "kv": max(1, s.num_kv_groups // 2), "heads": max(1, s.num_kv_groups // 2) * hpg}
    out["hidden"] = {**base, "hidden": max(1, arch.hidden_size // 2)}
    out["layer"] = {**base, "layers": max(1, arch.num_layers // 2)}
    return out


def _hf_model(arch: Architecture, w: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=w["hidden"], intermediate_size=w["ffn"],
                      num_hidden_layers=w["layers"], num_attention_heads=w["heads"], num_key_value_heads=w["kv"],
                      head_dim=arch.head_dim, tie_word_embeddings=arch.tie_word_embeddings,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.float32).eval()


def measure_variants(arch: Architecture, *, context: int = 64, new_tokens: int = 32, rounds: int = 3,
                     log=print) -> dict:
    """Seconds per token of batch-1 greedy decode (transformers, fp32, CPU) of every variant,
    the best of ``rounds``; the variants take turns in every round so a slow spell hits all."""
    import torch

    ids = torch.randint(0, arch.vocab_size, (1, context))
    models = {name: _hf_model(arch, w) for name, w in variants(arch).items()}

    def run(model):
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           attention_mask=torch.ones_like(ids))
            return (time.perf_counter() - t) / new_tokens

    best = {}
    for name, m in models.items():
        run(m)  # warm-up
    for r in range(rounds):
        for name, m in models.items():
            best[name] = min(best.get(name, float("inf")), run(m))
        log(f"[latency] round {r + 1}/{rounds}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in best.items()))
    if "head" not in best:  # one head per group: no head unit exists; its cost does not matter
        best["head"] = best["base"]
    return best


def measure_table(arch: Architecture, runtime: str = "transformers", **kw) -> LatencyTable:
    if runtime not in RUNTIMES:
        raise UserError(f"latency runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    import torch

    return from_timings(arch, measure_variants(arch, **kw), runtime, threads=torch.get_num_threads())


def main(argv=None):
    import argparse

    from megatron_effllm.convert.hf_io import load_hf_model
    from megatron_effllm.errors import cli_entry
    from megatron_effllm.training.source import resolve_source

    @cli_entry
    def run(argv):
        ap = argparse.ArgumentParser(description="Measure the decode latency table of a model's shape "
                                     "(prune.cost: latency reads it via prune.latency_table)")
        ap.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf, or smollm2-135m")
        ap.add_argument("--out", required=True, help="JSON file to write")
        ap.add_argument("--runtime", default="transformers", choices=RUNTIMES)
        ap.add_argument("--rounds", type=int, default=3)
        args = ap.parse_args(argv)
        table = measure_table(load_hf_model(resolve_source(args.model)).arch, args.runtime, rounds=args.rounds)
        table.save(args.out)
        print(json.dumps(asdict(table), indent=1))

    run(argv)


if __name__ == "__main__":
    main()
