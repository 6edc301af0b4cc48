"""Decode-step attention without copying the key/value cache for grouped-query heads.

With a padding mask, transformers' SDPA path (up to at least 5.17) expands the cache with `repeat_kv` for every layer
and step: at batch 32 that copy costs more memory traffic than the weights. For a single query token the query heads
that share a key/value head can instead be laid out as G "query positions" of that head, so SDPA attends to the
cache as it is. Prompts (several query tokens) and anything unusual go to the stock SDPA function unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "vlmgraft_packed_gqa"


def packed_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if q_len != 1 or q_heads == kv_heads or per_head_mask or dropout or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    packed = query.reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, q_heads, 1, head_dim).transpose(1, 2), None


AttentionInterface.register(NAME, packed_gqa_attention)
try:  # mask creation for 2D masks keeps working if someone runs generate() while the switch is on
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(NAME, sdpa_mask)
except ImportError:  # pragma: no cover - older transformers
    pass


@contextlib.contextmanager
def packed_attention(text_config):
    """Use the packed decode attention in the text model for the duration of the block (SDPA models only)."""
    previous = text_config._attn_implementation
    if previous != "sdpa":
        yield
        return
    text_config._attn_implementation = NAME
    try:
        yield
    finally:
        text_config._attn_implementation = previous
