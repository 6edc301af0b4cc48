"""The SmolVLM family's training image path (`vlmgraft.model.images.SmolVLMImages.train_embeddings`), which reads
nothing back from the GPU.

transformers' SmolVLM forward finds the real tiles with a boolean index, splits the features with `.tolist()`,
formats the image-token count into its check's message, and merges with `masked_scatter`, whose backward is a
`masked_select`: each one waits until the GPU has finished everything queued. In the `finetune` step the CPU then
sits in one of those waits while the GPU runs the vision tower, time it needs to queue the LLM's LoRA-laden layers,
so the GPU then waits for the CPU (bench/bench_train_run.py --stage finetune --profile FILE).

The collator already knows where the real tiles and the image tokens are (its LossPlan). `images_into_embeddings`
runs the same modules as transformers (patch embeddings, encoder, post-norm, connector) on those tiles and writes
the features into the token embeddings with index operations, whose backward reads nothing back either. Batches
without a plan and models of another layout take transformers' own path. Under DDP the vision tower and connector
then run outside DistributedDataParallel.forward; their gradients are still averaged, since DDP's reducer hooks each
trained parameter's gradient whatever computed it, and every trained parameter gets one in each backward here.

A vision tower that trains nothing and holds 16-bit weights (`align`) runs outside the step's autocast, as it does at
inference. CUDA's autocast computes every layer norm in float32 and hands a float32 output on: the post-norm wrote
the (tiles×1024, 768) features as float32 (plus the casts before and after it), and the connector's pixel shuffle
then moved float32 too (bench/bench_vision_tower.py compares the two). The values are the same either way: a bf16 layer
norm also computes in float32 and rounds once, where autocast's output is rounded by the next matmul's cast.
With `compile` on, such a tower (patch embeddings, encoder, post-norm) is one compiled graph (`compile_frozen_tower`),
so the position embeddings' add and the post-norm fuse with their neighbours instead of running as eager kernels.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from vlmgraft.graft.families import SMOLVLM
from vlmgraft.model.common import unwrap_model
from vlmgraft.model.images import ImagePath


def to_device_nonblocking(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor to `device` without waiting for the device (pinned + non-blocking on CUDA)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _smolvlm_parts(model):
    """The vision tower and connector where the SmolVLM family declares them; None for other layouts."""
    base = unwrap_model(model)
    try:
        vision, connector = base.get_submodule(SMOLVLM.vision), base.get_submodule(SMOLVLM.connector)
    except AttributeError:
        return None
    if not all(hasattr(vision, part) for part in ("embeddings", "encoder", "post_layernorm")):
        return None
    return vision, connector


_FROZEN_16BIT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _frozen_16bit(vision: torch.nn.Module) -> bool:
    """Whether every weight of the tower is frozen and 16-bit: worked out at the first step, not at every one (a
    stage sets what trains before training starts)."""
    verdict = _FROZEN_16BIT.get(vision)
    if verdict is None:
        verdict = _FROZEN_16BIT[vision] = all(not p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)
                                              for p in vision.parameters())
    return verdict


def frozen_vision_outside_autocast(vision: torch.nn.Module, device: torch.device):
    """Autocast switched off around a vision tower whose weights are all frozen and 16-bit; else nothing changes
    (trained layers keep float32 master weights and need autocast to meet the frozen bf16 ones)."""
    if torch.is_autocast_enabled(device.type) and _frozen_16bit(vision):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def tower_features(vision: torch.nn.Module, tiles: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Patch embeddings, encoder and post-norm over whole tiles (every patch real, so no attention mask)."""
    hidden = vision.encoder(inputs_embeds=vision.embeddings(pixel_values=tiles, patch_attention_mask=patches))
    return vision.post_layernorm(hidden.last_hidden_state)


# Inductor recomputes a pointwise result in each kernel that reads it until it has accumulated 8 reads. Here that
# is the residual stream: the fused add + layer-norm kernels re-read up to five (tiles×1024, 768) buffers instead of
# one stored sum. Storing it once it reads more than two made those kernels faster than the default and than a
# threshold of 1 (bench/bench_vision_tower.py --variants tower,tower-realize1,tower-realize2).
TOWER_INDUCTOR_OPTIONS = {"realize_acc_reads_threshold": 2}
_COMPILED_TOWERS: weakref.WeakSet = weakref.WeakSet()
_compiled_tower_features = None


def compile_frozen_tower(model) -> bool:
    """Run this model's vision tower through one compiled graph from now on, if it is a SmolVLM-layout tower that
    trains nothing (a trained layer's backward needs its own boundaries: those stay compiled layer by layer)."""
    global _compiled_tower_features
    parts = _smolvlm_parts(model)
    if parts is None or any(p.requires_grad for p in parts[0].parameters()):
        return False
    if _compiled_tower_features is None:
        import torch._inductor.config as inductor_config

        options = {k: v for k, v in TOWER_INDUCTOR_OPTIONS.items() if hasattr(inductor_config, k)}
        _compiled_tower_features = torch.compile(tower_features, options=options or None)
    _COMPILED_TOWERS.add(parts[0])
    return True


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
    tiles = tiles.to(vision.embeddings.patch_embedding.weight.dtype)
    # The collator's real tiles are whole (its pixel mask is all true there), so every patch is real.
    size = vision.embeddings.patch_size
    patches = torch.ones((tiles.shape[0], tiles.shape[2] // size, tiles.shape[3] // size), dtype=torch.bool,
                         device=device)
    features_of = _compiled_tower_features if vision in _COMPILED_TOWERS else tower_features
    with frozen_vision_outside_autocast(vision, device):
        hidden = features_of(vision, tiles, patches)
    features = connector(hidden)
    embeds = unwrap_model(model).get_input_embeddings()(input_ids)
    return ImagePath.merge(embeds, to_device_nonblocking(plan.image_positions, device), features)
