"""The training step's image path without reading anything back from the GPU.

transformers' SmolVLM forward finds the real tiles with a boolean index, splits the features with `.tolist()`,
formats the image-token count into its check's message, and merges with `masked_scatter`, whose backward is a
`masked_select`: each one waits until the GPU has finished everything queued. In a profile of the `finetune` step
(bench/RESULTS.md) the CPU sat 41 ms per step in one of those waits while the GPU ran the vision tower, time it
needed to queue the LLM's LoRA-laden layers, so the GPU then waited for the CPU.

The collator already knows where the real tiles and the image tokens are (its LossPlan). `images_into_embeddings`
runs the same modules as transformers (patch embeddings, encoder, post-norm, connector) on those tiles and writes
the features into the token embeddings with index operations, whose backward reads nothing back either. Batches
without a plan and models of another layout take transformers' own path. Under DDP the vision tower and connector
then run outside DistributedDataParallel.forward; their gradients are still averaged, since DDP's reducer hooks each
trained parameter's gradient whatever computed it, and every trained parameter gets one in each backward here.
"""

from __future__ import annotations

import torch

from vlmgraft.train.stages import unwrap_model


def to_device_nonblocking(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor to `device` without waiting for the device (pinned + non-blocking on CUDA)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _smolvlm_parts(model):
    inner = getattr(unwrap_model(model), "model", None)
    vision, connector = getattr(inner, "vision_model", None), getattr(inner, "connector", None)
    if vision is None or connector is None:
        return None
    if not all(hasattr(vision, part) for part in ("embeddings", "encoder", "post_layernorm")):
        return None
    return vision, connector


def images_into_embeddings(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, plan) -> torch.Tensor | None:
    """Token embeddings with every image token replaced by its tile's features; None where this path does not apply
    (no positions in the plan, or not a SmolVLM-layout model)."""
    parts = _smolvlm_parts(model)
    if parts is None or plan.image_positions is None or plan.tile_index is None:
        return None
    vision, connector = parts
    device = input_ids.device
    tiles = pixel_values.flatten(0, 1)
    if plan.tile_index.numel() != tiles.shape[0]:  # some rows have padding tiles
        tiles = tiles.index_select(0, to_device_nonblocking(plan.tile_index, device))
    embedding = vision.embeddings
    tiles = tiles.to(embedding.patch_embedding.weight.dtype)
    # The collator's real tiles are whole (its pixel mask is all true there), so every patch is real.
    size = embedding.patch_size
    patches = torch.ones((tiles.shape[0], tiles.shape[2] // size, tiles.shape[3] // size), dtype=torch.bool,
                         device=device)
    hidden = vision.encoder(inputs_embeds=embedding(pixel_values=tiles, patch_attention_mask=patches)).last_hidden_state
    features = connector(vision.post_layernorm(hidden))
    embeds = unwrap_model(model).get_input_embeddings()(input_ids)
    width = embeds.shape[-1]
    # index_copy checks on the CPU that there are as many features as image tokens (shapes only, no GPU read).
    merged = embeds.reshape(-1, width).index_copy(0, to_device_nonblocking(plan.image_positions, device),
                                                  features.reshape(-1, width).to(embeds.dtype))
    return merged.view_as(embeds)
