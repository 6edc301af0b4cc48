"""SigLIP2 NaFlex checkpoints → the fixed-resolution SigLIP layout, which the LLaVA family then grafts.

NaFlex towers take pre-cut patches of any aspect ratio: the patch embedding is a Linear over each patch flattened as
(ph, pw, c), and the square position table is resized to every image's patch grid on the fly. Fixed-resolution SigLIP
takes a square image: a Conv2d patch embedding and one position per patch. So:

- the Linear weight (D, p·p·C), read as (D, p, p, C), becomes the Conv2d weight (D, C, p, p); the bias is unchanged;
- the position table (g², D) is resized once (bilinear, antialias, as NaFlex does per image) to the target grid;
- every other tensor keeps its name and value (the encoder, the post-norm, the pooling head and the text tower are
  the same modules in both layouts).

The result is checked against `Siglip2VisionModel` itself on a full square grid at the target size, and the build
refuses a conversion whose features differ.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    PreTrainedModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmgraft.errors import VlmgraftError

NAFLEX_TYPES = ("siglip2", "siglip2_vision_model")
CHECK_TOL = 1e-4  # relative to the features' RMS: float32 reordering only
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "vision_use_head")


def native_size(vision) -> int:
    """The image side whose patch grid is the position table's own (e.g. 16×16 patches of 16 px → 256)."""
    grid = math.isqrt(vision.num_patches)
    if grid * grid != vision.num_patches:
        raise VlmgraftError(f"the NaFlex donor's vision config has num_patches {vision.num_patches}, not a square grid")
    return grid * vision.patch_size


def patch_weight_to_conv(weight: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Linear (D, p·p·C) over patches flattened as (ph, pw, c) → Conv2d (D, C, p, p)."""
    return weight.reshape(weight.shape[0], patch, patch, channels).permute(0, 3, 1, 2).contiguous()


def resize_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(g², D) square table → (grid², D), bilinear with antialias as NaFlex resizes it for each image."""
    side = math.isqrt(table.shape[0])
    square = table.float().reshape(side, side, -1).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(square, size=(grid, grid), mode="bilinear", align_corners=False,
                                              antialias=True)
    return resized[0].permute(1, 2, 0).reshape(grid * grid, -1).to(table.dtype)


def _fixed_config(donor_config, naflex, image_size: int):
    """The SigLIP config of the same towers at a fixed `image_size` (a dual config when the donor is dual)."""
    vision = SiglipVisionConfig(image_size=image_size, **{k: getattr(naflex, k) for k in _VISION_FIELDS
                                                          if hasattr(naflex, k)})
    if donor_config.model_type == "siglip2_vision_model":
        return vision
    text = {**donor_config.text_config.to_dict(), "model_type": "siglip_text_model"}
    return SiglipConfig(text_config=text, vision_config=vision.to_dict())


def convert_naflex(donor: PreTrainedModel, image_processor, image_size: int | None = None):
    """(fixed-resolution SigLIP model, its SiglipImageProcessor, a report of what was converted)."""
    naflex = getattr(donor.config, "vision_config", None) or donor.config
    image_size = image_size or native_size(naflex)
    if image_size % naflex.patch_size:
        raise VlmgraftError(f"--image-size {image_size} is not a multiple of the donor's patch size "
                            f"{naflex.patch_size}")
    config = _fixed_config(donor.config, naflex, image_size)
    dual = isinstance(config, SiglipConfig)
    fixed = SiglipModel(config) if dual else SiglipVisionModel(config)
    prefix = "vision_model." if dual else ""
    state = dict(donor.state_dict())
    patch, position = prefix + "embeddings.patch_embedding.weight", prefix + "embeddings.position_embedding.weight"
    grid = image_size // naflex.patch_size
    state[patch] = patch_weight_to_conv(state[patch], naflex.patch_size, naflex.num_channels)
    state[position] = resize_positions(state[position], grid)
    result = fixed.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VlmgraftError(f"the NaFlex donor does not map onto the SigLIP layout: missing {result.missing_keys[:4]}, "
                            f"unexpected {result.unexpected_keys[:4]}")
    fixed.eval()
    processor = SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                     resample=image_processor.resample, image_mean=image_processor.image_mean,
                                     image_std=image_processor.image_std,
                                     rescale_factor=image_processor.rescale_factor)
    side = math.isqrt(naflex.num_patches)
    diff = check_against_naflex(donor, fixed, naflex, image_size)
    report = {"image_size": image_size, "max_rel_diff_vs_siglip2": diff,
              "converted": {patch: f"Linear {tuple(donor.state_dict()[patch].shape)} over (ph, pw, c) patches → "
                                   f"Conv2d {tuple(state[patch].shape)}",
                            position: f"{side}×{side} position table → {grid}×{grid}, bilinear with antialias"}}
    return fixed, processor, report


@torch.no_grad()
def check_against_naflex(naflex_model: PreTrainedModel, fixed: PreTrainedModel, naflex, image_size: int,
                         seed: int = 0) -> float:
    """Max |Δ| / RMS between the two towers' last hidden states on one random image, a full square grid."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn((1, naflex.num_channels, image_size, image_size), generator=generator)
    p, grid = naflex.patch_size, image_size // naflex.patch_size
    patches = image.reshape(1, naflex.num_channels, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(1, grid * grid, p * p * naflex.num_channels)
    tower = getattr(naflex_model, "vision_model", naflex_model)
    expected = tower(pixel_values=patches, pixel_attention_mask=torch.ones((1, grid * grid), dtype=torch.long),
                     spatial_shapes=torch.tensor([[grid, grid]])).last_hidden_state
    got = getattr(fixed, "vision_model", fixed)(pixel_values=image).last_hidden_state
    diff = ((got - expected).abs().max() / expected.pow(2).mean().sqrt()).item()
    if not diff <= CHECK_TOL:
        raise VlmgraftError(f"the NaFlex → SigLIP conversion changed the vision features (max |Δ|/RMS {diff:.2e} > "
                            f"{CHECK_TOL:g}); the donor is not a standard Siglip2 checkpoint")
    return diff
