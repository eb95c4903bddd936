"""A megatron-core GPTModel built from an ``Architecture``, every layer with its own widths.

megatron-core's TransformerBlock asks ``config.get_config_for_layer(n)`` for each layer when
``config.heterogeneous_block_specs`` is set; ``PerLayerTransformerConfig`` answers with the
exact query heads, KV groups and FFN width of that layer (no rounding), so a pruned,
non-uniform model is an ordinary GPTModel whose layers simply differ in size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_effllm.architecture import Architecture
from megatron_effllm.layout import stage_layer_counts
from megatron_effllm.errors import UserError
from megatron_effllm.model.attention import SDPAttention
from megatron_effllm.model.sequence_parallel import reduce_sequence_parallel_grads, sequence_parallel_block
from megatron_effllm.parallel.runtime import cpu_device_mode, ensure_cpu_support

_BASE_FIELDS = tuple(f.name for f in dataclasses.fields(TransformerConfig) if f.init)


@dataclass
class PerLayerTransformerConfig(TransformerConfig):
    """TransformerConfig whose layers each take their own (heads, KV groups, FFN width).

    ``layer_widths[i]`` is for global layer i (0-based); megatron numbers layers from 1.
    The block-level fields (num_attention_heads etc.) hold layer 0's widths.
    """

    layer_widths: tuple = field(default=())

    def __post_init__(self):
        super().__post_init__()
        if len(self.layer_widths) != self.num_layers:
            raise UserError(
                f"{len(self.layer_widths)} per-layer widths for {self.num_layers} layers; "
                "the architecture is inconsistent"
            )
        self.heterogeneous_block_specs = True

    def get_config_for_layer(self, layer_number: int) -> TransformerConfig:
        heads, kv, ffn = self.layer_widths[layer_number - 1]
        values = {name: getattr(self, name) for name in _BASE_FIELDS}
        values.update(num_attention_heads=heads, num_query_groups=kv, ffn_hidden_size=ffn)
        return TransformerConfig(**values)


def te_available() -> bool:
    try:  # TransformerEngine is optional (GPU clusters only)
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _rope_settings(arch: Architecture) -> dict:
    """GPTModel RoPE arguments for the architecture's rope_scaling, plus llama3 parameters
    that megatron's constructor cannot take (applied after construction)."""
    scaling = arch.rope_scaling
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return {
            "llama3": {
                "factor": float(scaling.get("factor", 8.0)),
                "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
                "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
                "original_max_position_embeddings": int(
                    scaling.get("original_max_position_embeddings", 8192)
                ),
            }
        }
    if kind == "linear":
        return {"seq_len_interpolation_factor": float(scaling["factor"])}
    raise UserError(
        f"RoPE scaling type {kind!r} is not supported by the megatron model; "
        "supported: llama3, linear (or none)"
    )


@dataclass(frozen=True)
class Recompute:
    """Activation recompute: ``none``, ``selective`` (megatron's core attention) or ``full``
    (whole layers; ``method`` uniform: every layer, ``num_layers`` per recomputed chunk; block:
    only the first ``num_layers`` layers of each pipeline stage)."""

    granularity: str = "none"
    method: str = "uniform"
    num_layers: int = 1

    def megatron_fields(self, stage_layers: list[int]) -> dict:
        """TransformerConfig fields for pipeline stages of ``stage_layers`` layers. A uniform
        chunk must divide every stage's layer count (megatron would index past the stage), so
        ``num_layers`` is lowered to the largest size that does: a prune may remove layers."""
        if self.granularity == "none":
            return {}
        if self.granularity == "selective":
            return {"recompute_granularity": "selective"}
        n = max(1, min(self.num_layers, *stage_layers))
        if self.method == "uniform":
            n = next(k for k in range(n, 0, -1) if all(c % k == 0 for c in stage_layers))
        return {"recompute_granularity": "full", "recompute_method": self.method, "recompute_num_layers": n}


def make_transformer_config(
    arch: Architecture,
    *,
    params_dtype: torch.dtype = torch.float32,
    tp: int = 1,
    pp: int = 1,
    init_weights: bool = True,
    recompute: Recompute = Recompute(),
    sequence_parallel: bool = False,
) -> PerLayerTransformerConfig:
    """The megatron-core config for ``arch`` under tensor/pipeline sizes ``tp``/``pp``."""
    arch.validate(tensor_parallel=tp)
    _rope_settings(arch)  # unsupported RoPE scaling fails here, before any model is built
    if arch.vocab_size % tp:
        raise UserError(
            f"vocab size {arch.vocab_size} is not divisible by tensor parallel size {tp}; "
            "choose a TP size that divides the vocabulary"
        )
    first = arch.layers[0]
    counts = stage_layer_counts(arch.num_layers, pp)
    kwargs = recompute.megatron_fields(counts)
    if pp > 1:
        layout = [["decoder"] * n for n in counts]
        layout[0].insert(0, "embedding")
        layout[-1].append("loss")
        kwargs["pipeline_model_parallel_layout"] = layout
    window = arch.extra.get("sliding_window")
    if window:
        # HF: key k visible from query q when q - window < k <= q.
        kwargs["window_size"] = (int(window) - 1, 0)
    return PerLayerTransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=first.num_heads,
        num_query_groups=first.num_kv_groups,
        ffn_hidden_size=first.ffn_hidden_size,
        kv_channels=arch.head_dim,
        layer_widths=tuple(l.widths for l in arch.layers),
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        rotary_interleaved=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        attention_softmax_in_fp32=True,  # as megatron: the softmax upcasts under bf16/fp16
        use_cpu_initialization=not torch.cuda.is_available(),
        cuda_graph_scope=[],
        perform_initialization=init_weights,
        **kwargs,
    )


def build_gpt_model(
    arch: Architecture,
    *,
    params_dtype: torch.dtype = torch.float32,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    use_te: Optional[bool] = None,
    init_weights: bool = True,
    recompute: Recompute = Recompute(),
    sequence_parallel: bool = False,
) -> GPTModel:
    """Build this process's part of the megatron-core GPTModel for ``arch``.

    Needs megatron's parallel groups (``parallel.runtime.init_model_parallel``). The TP/PP
    sizes and this rank's pipeline stage come from them; ``pre_process``/``post_process``
    default to "first stage"/"last stage". ``use_te=None`` uses TransformerEngine when it is
    importable (then norms are fused into ``linear_qkv``/``linear_fc1``), else the local spec.
    The embedding and output layer have exactly ``arch.vocab_size`` rows (no padding, so the
    vocabulary must be divisible by the TP size; UserError otherwise). Pipeline stages take
    ``layout.stage_layer_counts`` layers each (uneven splits allowed).
    Weights are randomly initialised (left uninitialised with ``init_weights=False``, when
    real ones are loaded next: ``model.weights.load_canonical`` or a checkpoint).
    ``recompute``: activation recompute in training forwards (``Recompute``).
    ``sequence_parallel``: megatron's sequence parallelism at TP > 1 (``parallel.sequence_parallel``).
    """
    ensure_cpu_support()
    if not parallel_state.model_parallel_is_initialized():
        raise UserError(
            "megatron parallel groups are not initialised; call "
            "megatron_effllm.parallel.runtime.init_model_parallel(tp, pp) first"
        )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    if use_te is None:
        use_te = te_available()
    elif use_te and not te_available():
        raise UserError("TransformerEngine is not installed; set model.layers: local (or auto), or install transformer-engine")

    config = make_transformer_config(
        arch, params_dtype=params_dtype, tp=tp, pp=pp, init_weights=init_weights, recompute=recompute,
        sequence_parallel=sequence_parallel,
    )
    rope = _rope_settings(arch)
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = _with_sdpa(get_gpt_layer_local_spec(normalization="RMSNorm"))
    if sequence_parallel:
        spec = sequence_parallel_block(spec, config, fused_norms=use_te)
    with cpu_device_mode():
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            seq_len_interpolation_factor=rope.get("seq_len_interpolation_factor"),
        )
    _cast_parameters(model, params_dtype)
    if not init_weights:
        mark_tensor_parallel_weights(model)
    if sequence_parallel:
        reduce_sequence_parallel_grads(model)
    if "llama3" in rope:
        rot = model.rotary_pos_emb
        rot.inv_freq = rot._apply_scaling(rot.inv_freq, **rope["llama3"])
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter in ``dtype``: the local spec's torch norms ignore ``params_dtype``
    (megatron's Float16Module casts them afterwards). Buffers stay as built (RoPE frequencies
    in fp32), as DeepSpeed's cast leaves them."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _with_sdpa(spec):
    """The local layer spec with its core attention on SDPA; a copy, so
    megatron's own spec objects stay as they were."""
    attention = spec.submodules.self_attention
    core = dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    layer = dataclasses.replace(spec.submodules, self_attention=dataclasses.replace(attention, submodules=core))
    return dataclasses.replace(spec, submodules=layer)


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give the split weights megatron's tensor-parallel attributes, which megatron-core sets only
    while it initialises them (``perform_initialization``). Without them a model built to load
    weights would look replicated to whatever reads the attributes: DeepSpeed's gradient-norm
    clipping would count each shard on TP rank 0 only."""
    for module in model.modules():
        if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, torch.nn.Parameter) and not hasattr(w, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(w, True, dim, 1)
