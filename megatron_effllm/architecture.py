"""The per-layer shape of a Llama-family decoder: what every other part of the system reads.

An ``Architecture`` is immutable. Pruning produces a new one; the model builder, the converters,
the pruner and the exporters all take their shapes from it, never from a framework config.

Layers that depth pruning removed are dropped from ``layers``; each surviving layer remembers
the index it had in the source model (``source_index``), so weights can always be traced back.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from megatron_effllm.errors import UserError

FAMILIES = ("llama", "qwen2", "mistral")
SCHEMA_VERSION = 1


class ArchitectureError(UserError):
    """An impossible or inconsistent shape."""


@dataclass(frozen=True)
class LayerShape:
    """Widths of one transformer block."""

    num_heads: int  # query heads
    num_kv_groups: int  # key/value heads (GQA groups); num_heads % num_kv_groups == 0
    ffn_hidden_size: int  # SwiGLU intermediate width
    source_index: int  # index of this layer in the source (unpruned) model

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_groups

    @property
    def widths(self) -> tuple[int, int, int]:
        """(query heads, KV groups, FFN width)."""
        return self.num_heads, self.num_kv_groups, self.ffn_hidden_size


@dataclass(frozen=True)
class Architecture:
    family: str
    hidden_size: int
    head_dim: int
    vocab_size: int
    layers: tuple[LayerShape, ...]
    num_source_layers: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    max_position_embeddings: int = 2048
    # Source hidden size; the hidden (stem) channels kept are recorded by the pruner, not here.
    extra: dict = field(default_factory=dict)  # family-specific fields carried through export

    # ------------------------------------------------------------------ construction
    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        self.validate()

    @classmethod
    def uniform(
        cls,
        *,
        family: str = "llama",
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        num_kv_groups: int,
        ffn_hidden_size: int,
        vocab_size: int,
        head_dim: Optional[int] = None,
        **kwargs,
    ) -> "Architecture":
        if head_dim is None:
            if hidden_size % num_heads:
                raise ArchitectureError(
                    f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}; "
                    "pass head_dim explicitly"
                )
            head_dim = hidden_size // num_heads
        layers = tuple(
            LayerShape(num_heads, num_kv_groups, ffn_hidden_size, i) for i in range(num_layers)
        )
        return cls(
            family=family,
            hidden_size=hidden_size,
            head_dim=head_dim,
            vocab_size=vocab_size,
            layers=layers,
            num_source_layers=num_layers,
            **kwargs,
        )

    def replace(self, **changes) -> "Architecture":
        return dataclasses.replace(self, **changes)

    def with_layers(self, layers: Iterable[LayerShape]) -> "Architecture":
        return self.replace(layers=tuple(layers))

    # ------------------------------------------------------------------ queries
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the same heads, KV groups and FFN width.

        A stock HF config also needs hidden_size divisible by the head count (transformers'
        LlamaConfig checks it even with an explicit head_dim); ``convert.hf_io.needs_remote_code``
        decides the export format.
        """
        first = self.layers[0]
        return all(l.widths == first.widths for l in self.layers)

    def layer_exists(self, source_index: int) -> bool:
        return any(l.source_index == source_index for l in self.layers)

    # ------------------------------------------------------------------ parameter counting
    def count_params(
        self,
        hidden: Any = None,
        layers: Optional[Sequence[tuple[Any, Any, Any]]] = None,
        *,
        keep_layers: Optional[Sequence[Any]] = None,
        include_embeddings: bool = True,
    ) -> Any:
        """The parameter count: the one formula every count, cost and expectation uses.

        ``hidden`` (default ``hidden_size``) and ``layers`` (one (query heads, KV groups, FFN
        width) per layer; default this architecture's) may replace the widths, and
        ``keep_layers`` weights each block (default 1). Integers give the exact count; tensors
        of expected counts (``pruning.l0.expected_params``) give a differentiable expectation,
        since the count is linear in each width. Tied embeddings are counted once;
        ``include_embeddings=False`` leaves out the embedding and lm_head, the convention the
        scaling-law literature and SmolLM use.
        """
        D = self.hidden_size if hidden is None else hidden
        if layers is None:
            layers = [l.widths for l in self.layers]
        emb = D * self.vocab_size * (1 if self.tie_word_embeddings else 2) if include_embeddings else 0
        total = emb + D  # final norm
        for i, (heads, kv, ffn) in enumerate(layers):
            block = self._block_params(heads, kv, ffn, D)
            total = total + (block if keep_layers is None else keep_layers[i] * block)
        return total

    def _block_params(self, heads: Any, kv: Any, ffn: Any, hidden: Any) -> Any:
        """One block: q/o (heads), k/v (KV groups), q/k/v biases, gate/up/down, two norms."""
        d = self.head_dim
        bias = (heads + 2 * kv) * d if self.qkv_bias else 0
        return 2 * heads * d * hidden + 2 * kv * d * hidden + bias + 3 * ffn * hidden + 2 * hidden

    def embedding_params(self) -> int:
        return self.num_params() - self.num_params(include_embeddings=False)

    def layer_params(self, layer: LayerShape) -> int:
        return self._block_params(*layer.widths, self.hidden_size)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Total parameter count (``count_params`` of this architecture's own widths)."""
        return self.count_params(include_embeddings=include_embeddings)

    def widths_summary(self) -> str:
        """Compact per-layer shape for logs: 'L0 9h/3kv/1536 | L1 ...'."""
        return " | ".join(
            f"L{l.source_index} {l.num_heads}h/{l.num_kv_groups}kv/{l.ffn_hidden_size}"
            for l in self.layers
        )

    # ------------------------------------------------------------------ validation
    def validate(self, tensor_parallel: int = 1) -> None:
        """Raise ArchitectureError naming the first impossible field."""
        if self.family not in FAMILIES:
            raise ArchitectureError(
                f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}"
            )
        for name in ("hidden_size", "head_dim", "vocab_size", "num_source_layers"):
            if int(getattr(self, name)) <= 0:
                raise ArchitectureError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.layers:
            raise ArchitectureError("an architecture needs at least one layer")
        if tensor_parallel < 1:
            raise ArchitectureError(f"tensor parallel size must be >= 1, got {tensor_parallel}")
        seen = set()
        for pos, l in enumerate(self.layers):
            where = f"layer {pos} (source layer {l.source_index})"
            if l.num_heads < 1 or l.num_kv_groups < 1 or l.ffn_hidden_size < 1:
                raise ArchitectureError(
                    f"{where}: heads, KV groups and FFN width must be >= 1 "
                    f"(got {l.num_heads}, {l.num_kv_groups}, {l.ffn_hidden_size}); "
                    "remove the whole layer instead"
                )
            if l.num_heads % l.num_kv_groups:
                raise ArchitectureError(
                    f"{where}: {l.num_heads} query heads are not divisible by "
                    f"{l.num_kv_groups} KV groups; every group must keep the same number of heads"
                )
            for what, n in (
                ("query heads", l.num_heads),
                ("KV groups", l.num_kv_groups),
                ("FFN width", l.ffn_hidden_size),
            ):
                if n % tensor_parallel:
                    raise ArchitectureError(
                        f"{where}: {what} {n} not divisible by tensor parallel size "
                        f"{tensor_parallel}; choose a TP size that divides it"
                    )
            if not 0 <= l.source_index < self.num_source_layers or l.source_index in seen:
                raise ArchitectureError(f"{where}: bad or repeated source_index {l.source_index}")
            seen.add(l.source_index)
        if [l.source_index for l in self.layers] != sorted(seen):
            raise ArchitectureError("layers must stay in source order")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(l) for l in self.layers]
        d["schema_version"] = SCHEMA_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Architecture":
        d = dict(d)
        version = d.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ArchitectureError(
                f"architecture schema version {version} is not supported (expected {SCHEMA_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ArchitectureError(f"unknown architecture fields: {', '.join(sorted(unknown))}")
        try:
            d["layers"] = tuple(LayerShape(**l) for l in d["layers"])
            return cls(**d)
        except (TypeError, KeyError) as err:
            raise ArchitectureError(f"malformed architecture description: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Architecture":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ArchitectureError(f"architecture JSON is not valid JSON: {err}") from None

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Architecture":
        if not os.path.isfile(path):
            raise ArchitectureError(f"architecture file {path} not found")
        with open(path) as f:
            return cls.from_json(f.read())

    # ------------------------------------------------------------------ HF configs
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "Architecture":
        """Read a stock HF Llama/Qwen2/Mistral config dict, or one this project exported.

        Per-layer lists (``num_attention_heads_per_layer`` etc.) written by the non-uniform
        exporter take precedence over the scalar fields.
        """
        model_type = cfg.get("model_type")
        family = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}.get(model_type)
        if family is None and model_type == "effllm":
            family = cfg.get("effllm_family")
        if family is None:
            raise ArchitectureError(
                f"unsupported model_type {model_type!r}; supported: llama, qwen2, mistral "
                "(Llama-family decoders)"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ArchitectureError(
                f"hidden_act {cfg.get('hidden_act')!r} is not supported; Llama-family SwiGLU uses 'silu'"
            )
        n = int(cfg["num_hidden_layers"])
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        heads_l = cfg.get("num_attention_heads_per_layer") or [heads] * n
        kv_l = cfg.get("num_key_value_heads_per_layer") or [kv] * n
        ffn_l = cfg.get("intermediate_size_per_layer") or [int(cfg["intermediate_size"])] * n
        src_l = cfg.get("source_layer_indices") or list(range(n))
        num_source = int(cfg.get("num_source_layers") or n)
        if not (len(heads_l) == len(kv_l) == len(ffn_l) == len(src_l) == n):
            raise ArchitectureError(
                "per-layer lists in the config do not match num_hidden_layers; the config is damaged"
            )
        if family == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(cfg.get("attention_bias", False))
            if qkv_bias:
                raise ArchitectureError(
                    "attention_bias=True (bias on o_proj too) is not supported; only Qwen2-style qkv bias"
                )
        if family == "mistral" and cfg.get("sliding_window") not in (None, 0) and int(
            cfg.get("sliding_window")
        ) < int(cfg.get("max_position_embeddings", 0)):
            extra = {"sliding_window": cfg.get("sliding_window")}
        else:
            extra = {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if cfg.get(key) is not None:
                extra[key] = cfg[key]
        return cls(
            family=family,
            hidden_size=hidden,
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            layers=tuple(
                LayerShape(int(h), int(k), int(f), int(s))
                for h, k, f, s in zip(heads_l, kv_l, ffn_l, src_l)
            ),
            num_source_layers=num_source,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=float(
                cfg.get("rope_theta")
                or (cfg.get("rope_parameters") or {}).get("rope_theta")
                or 10000.0
            ),
            rope_scaling=_rope_scaling(cfg),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            qkv_bias=qkv_bias,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            extra=extra,
        )


def _rope_scaling(cfg: dict[str, Any]) -> Optional[dict]:
    """Non-default RoPE scaling (Llama-3 'llama3' type etc.), or None for plain RoPE."""
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        params = cfg.get("rope_parameters") or {}
        if params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return dict(scaling) if scaling else None
