"""Helpers every stage shares about a loaded graft: dtype names, unwrapping, the LLM's config, image token counts."""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def unwrap_model(model):
    """The transformers model inside DDP and PEFT wrappers (module paths as the donor family declares them)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config(model):
    """The LLM's config inside a (wrapped) VLM, or the model's own config for a text-only one; None without any."""
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "text_config", None) or config


def image_seq_len(config) -> int | None:
    """Image tokens per tile (SmolVLM) or per image (LLaVA) of a graft config; None where it depends on the image's
    size (Exaone4.5's patch grid)."""
    if getattr(config, "scale_factor", None) is not None:  # SmolVLM: the pixel shuffle folds scale² patches into one
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
    return getattr(config, "image_seq_length", None)
