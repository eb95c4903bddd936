"""Core attention for the local (non-TransformerEngine) layer spec on
``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the scores and the probabilities
([b, heads, s, s] each, ~8.6 GB per layer for Llama-3.2-1B at seq 4096 x micro-batch 4) and
repeats the KV groups for every query head. SDPA dispatches to the flash / memory-efficient
kernels on GPU (never materialising the scores, softmax accumulated in fp32) and to the fused
CPU kernel otherwise; grouped-query attention runs without repeating KV. The mask semantics
are megatron's: causal, optionally within the config's sliding window.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import utils as tutils
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_effllm.errors import UserError


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` (same constructor, same per-partition head counts, same scale)
    computed with ``scaled_dot_product_attention``."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        if self.softmax_offset is not None:
            raise UserError(f"softmax_type {config.softmax_type!r} needs megatron's DotProductAttention; "
                            "use the TransformerEngine spec or softmax_type: vanilla")
        self.window = (config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise UserError("packed sequences and attention bias need the TransformerEngine attention spec")
        sq, b, heads, dim = query.shape
        sk = key.size(0)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        keep = None  # SDPA's boolean mask: True = attend (megatron's masks: True = masked out)
        causal = False
        if attention_mask is not None:
            keep = ~attention_mask
        elif self.window is not None:
            keep = ~tutils.get_sliding_window_causal_mask(sq, sk, self.window).to(q.device)
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                causal = True
            else:
                keep = ~torch.triu(torch.ones(sq, sk, dtype=torch.bool, device=q.device), diagonal=sk - sq + 1)
        elif mask_type != AttnMaskType.no_mask:
            raise UserError(f"attention mask type {mask_type} needs an explicit attention mask")
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, is_causal=causal,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=k.size(1) != heads,
        )
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)
