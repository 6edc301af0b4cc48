"""Export-friendly views of a SmolVLM-architecture model: plain tensors in, plain tensors out.

ONNX graphs take flat tensor lists, so these wrappers turn the model's Cache objects and dataclass outputs into
named tensors: `VisionFeatures` (tiles → image features, vision encoder and connector in one graph),
`DecoderWithCache` (embeddings + past key/values → logits + present key/values) and `TokenEmbedder` (ids →
embeddings, so a runtime can splice image features in at the image-token positions).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache


class ExportableVisionEmbeddings(nn.Module):
    """SmolVLM's patch + position embeddings with `torch.bucketize` replaced by a comparison count.

    The TorchScript ONNX exporter turns `bucketize` into float indices that onnxruntime rejects. With
    `right=True`, bucketize(x, boundaries) is the number of boundaries <= x, which exports as Greater/ReduceSum;
    everything else repeats the stock computation step by step so the position ids are bit-identical.
    """

    def __init__(self, stock: nn.Module):
        super().__init__()
        self.stock = stock

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor) -> torch.Tensor:
        stock = self.stock
        batch = pixel_values.shape[0]
        embeddings = stock.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        side = stock.num_patches_per_side
        boundaries = torch.arange(1 / side, 1.0, 1 / side, device=pixel_values.device)
        step_h = 1.0 / patch_attention_mask[:, :, 0].sum(dim=1)
        step_w = 1.0 / patch_attention_mask[:, 0, :].sum(dim=1)
        rows = torch.arange(patch_attention_mask.shape[1], device=pixel_values.device, dtype=torch.float32)
        cols = torch.arange(patch_attention_mask.shape[2], device=pixel_values.device, dtype=torch.float32)
        frac_h = torch.clamp(rows[None, :] * step_h[:, None], max=1.0 - 1e-6)
        frac_w = torch.clamp(cols[None, :] * step_w[:, None], max=1.0 - 1e-6)
        bucket_h = (frac_h[..., None] >= boundaries).sum(-1)
        bucket_w = (frac_w[..., None] >= boundaries).sum(-1)
        position_ids = (bucket_h[:, :, None] * side + bucket_w[:, None, :]).reshape(batch, -1)
        position_ids = torch.where(patch_attention_mask.reshape(batch, -1), position_ids,
                                   torch.zeros_like(position_ids))
        return embeddings + stock.position_embedding(position_ids)


@contextmanager
def exportable_vision(model):
    """Temporarily swap in `ExportableVisionEmbeddings`; the model is unchanged afterwards."""
    vision = model.model.vision_model
    stock = vision.embeddings
    vision.embeddings = ExportableVisionEmbeddings(stock)
    try:
        yield model
    finally:
        vision.embeddings = stock


class VisionFeatures(nn.Module):
    """pixel_values [tiles, 3, H, W] + pixel_attention_mask [tiles, H, W] → image features [tiles, seq, hidden]."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.model.vision_model
        self.connector = model.model.connector
        self.patch_size = model.config.vision_config.patch_size

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
        # Same patch mask as SmolVLMModel.get_image_features: a patch counts if any of its pixels is real.
        size = self.patch_size
        patches = pixel_attention_mask.unfold(1, size, size).unfold(2, size, size)
        patch_attention_mask = patches.sum(dim=(-1, -2)) > 0
        hidden = self.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_attention_mask)
        return self.connector(hidden.last_hidden_state)


class TokenEmbedder(nn.Module):
    """input_ids [batch, seq] → inputs_embeds [batch, seq, hidden]."""

    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class DecoderWithCache(nn.Module):
    """(inputs_embeds, attention_mask, position_ids, past k0, past v0, k1, v1, ...) → (logits, present k0, v0, ...).

    The past tensors are [batch, kv_heads, past_len, head_dim]; a first step passes past_len = 0.
    """

    def __init__(self, model):
        super().__init__()
        self.text_model = model.model.text_model
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.text_config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (self.lm_head(out.last_hidden_state), *present)
