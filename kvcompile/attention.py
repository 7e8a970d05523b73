"""A packed-aware attention function for transformers models (``attn_implementation="kvcompile"``).

When the cache layer hands attention ``PackedKV`` tensors instead of dequantized ones, this function runs
``kvcompile::dequant_attention`` on them (the fused Triton kernel on CUDA where it supports the layout). Plain
tensors (a forward without a packed cache) go to transformers' own SDPA attention, so the model stays usable.

It is registered under the name "kvcompile" through transformers' extension points
(``AttentionInterface.register`` and ``AttentionMaskInterface.register``, the mask built as for SDPA) when
``kvcompile.apply(..., packed_attention=True)`` first needs it; nothing is registered at import.
"""

from __future__ import annotations

import torch

from . import ops
from .cache.packed import PackedKV

NAME = "kvcompile"


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    if isinstance(key, PackedKV):
        if dropout and module.training:
            raise NotImplementedError("kvcompile packed attention is for inference: dropout is not supported")
        # transformers passes no mask exactly when plain causal attention is meant
        causal = attention_mask is None and query.shape[2] > 1 if is_causal is None else is_causal
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(torch.float32)
        out = ops.attention(query, key, value, scale=scaling, mask=attention_mask, is_causal=causal)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
        # a compiled packed cache sizes the mask for its capacity; plain K/V here are a prefill's own tokens
        # (full_precision_prefill), positions 0 .. T - 1 of it
        attention_mask = attention_mask[..., : key.shape[-2]]

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> str:
    """Make ``attn_implementation="kvcompile"`` available in transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
