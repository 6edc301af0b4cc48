"""SigLIP and CLIP encoders (dual encoders or vision-only checkpoints) → a stock `LlavaForConditionalGeneration`.

The graft's `vision_config` is the donor's vision config (SigLIP's attention-pooling head switched off: LLaVA reads
patch features, never the pooled vector), its `text_config` the LLM's own config, and the connector LLaVA-1.5's
two-layer GELU projector, new at the LLM's width. How features are read from the tower differs per donor:

- SigLIP has no CLS token: every position is a patch, so `vision_feature_select_strategy="full"` on the last layer
  (`"default"` would drop a patch and the placeholder count would no longer match the features);
- CLIP puts a CLS token first: `"default"` drops it, and LLaVA-1.5 reads the penultimate layer (-2).

The processor is a stock `LlavaProcessor`: the donor's own image processor, the LLM's tokenizer (its `<|image_pad|>`
reused when it has one, else `<image>` added as a special token) and the LLM's chat template behind the image prelude.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaConfig, LlavaProcessor, PretrainedConfig, PreTrainedModel

from vlmgraft import hub
from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import LLAVA
from vlmgraft.graft.surgery import ConnectorInit, donor_vision_module, scaled_normal_init
from vlmgraft.graft.template import extend_chat_template

REUSED_IMAGE_TOKEN = "<|image_pad|>"  # Qwen reserves it (no new embedding row needed)
NEW_IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class LlavaDonor:
    kind: str
    select_strategy: str
    feature_layer: int
    extra_tokens: int  # positions the tower emits besides its patches (CLIP's CLS)


SIGLIP = LlavaDonor("siglip", select_strategy="full", feature_layer=-1, extra_tokens=0)
CLIP = LlavaDonor("clip", select_strategy="default", feature_layer=-2, extra_tokens=1)
DONORS = {"siglip": SIGLIP, "siglip_vision_model": SIGLIP, "clip": CLIP, "clip_vision_model": CLIP}


def donor_settings(model_type: str) -> LlavaDonor:
    if model_type not in DONORS:
        raise VlmgraftError(f"model_type {model_type!r} is not a SigLIP/CLIP donor ({', '.join(DONORS)})")
    return DONORS[model_type]


def vision_config_of(donor_config: PretrainedConfig) -> PretrainedConfig:
    """The tower's config: a dual encoder's `vision_config`, or a vision-only checkpoint's own config."""
    vision = copy.deepcopy(getattr(donor_config, "vision_config", None) or donor_config)
    if hasattr(vision, "vision_use_head"):
        vision.vision_use_head = False  # the pooled vector is never read by LLaVA; its weights are dropped
    return vision


def image_seq_length(vision: PretrainedConfig, settings: LlavaDonor) -> int:
    """Image tokens per image: the tower's positions at its own resolution, minus the CLS token "default" drops."""
    positions = (vision.image_size // vision.patch_size) ** 2 + settings.extra_tokens
    return positions - (1 if settings.select_strategy == "default" else 0)


def llava_config(donor_config: PretrainedConfig, llm_config: PretrainedConfig, image_token_id: int,
                 vocab_size: int) -> LlavaConfig:
    """Outer config whose `text_config` is the LLM's own; ids, vocab and tying agree on every level."""
    settings = donor_settings(donor_config.model_type)
    vision = vision_config_of(donor_config)
    text = llm_config.to_dict()
    text["vocab_size"] = vocab_size
    tied = bool(getattr(llm_config, "tie_word_embeddings", False))
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text, image_token_id=image_token_id,
                         projector_hidden_act="gelu", vision_feature_select_strategy=settings.select_strategy,
                         vision_feature_layer=settings.feature_layer,
                         image_seq_length=image_seq_length(vision, settings), multimodal_projector_bias=True,
                         tie_word_embeddings=tied, pad_token_id=getattr(llm_config, "pad_token_id", None))
    config.architectures = [LLAVA.export_architecture]
    return config


def processed_size(image_processor, image: Image.Image | None = None) -> tuple[int, int]:
    """(height, width) the image processor gives `image` (default: a small non-square one), resize and crop applied."""
    image = image or Image.new("RGB", (67, 41), (90, 120, 30))
    pixels = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    return int(pixels.shape[-2]), int(pixels.shape[-1])


def make_processor(llm: str, image_processor, donor_config: PretrainedConfig, image_token: str | None):
    """LlavaProcessor: the donor's image processor + the LLM's tokenizer and template (image prelude added)."""
    settings = donor_settings(donor_config.model_type)
    vision = vision_config_of(donor_config)
    size = processed_size(image_processor)
    if size != (vision.image_size, vision.image_size):
        raise VlmgraftError(f"the donor's preprocessor_config.json gives {size[0]}×{size[1]} images but its vision "
                            f"config has image_size {vision.image_size}; fix 'size'/'crop_size' there")
    if getattr(image_processor, "crop_size", None) is None:
        # LlavaProcessor counts placeholders for serving engines (`_get_num_multimodal_tokens`) from crop_size;
        # SigLIP's processor resizes without cropping, so the crop equal to the resize changes no pixel.
        kept = {k: v for k, v in image_processor.to_dict().items() if k != "image_processor_type"}
        image_processor = type(image_processor)(**{**kept, "crop_size": {"height": size[0], "width": size[1]}})
    original = hub.load(AutoTokenizer.from_pretrained, llm, "LLM tokenizer")
    if not original.chat_template:
        raise VlmgraftError(f"the LLM tokenizer of {llm!r} has no chat_template; use an instruct/chat model or add "
                            f"a chat_template to its tokenizer_config.json")
    old_vocab = original.get_vocab()
    token = image_token or (REUSED_IMAGE_TOKEN if REUSED_IMAGE_TOKEN in old_vocab else NEW_IMAGE_TOKEN)
    tokenizer = hub.load(AutoTokenizer.from_pretrained, llm, "LLM tokenizer",
                         extra_special_tokens={"image_token": token})
    new_ids = [] if token in old_vocab else [tokenizer.convert_tokens_to_ids(token)]
    if tokenizer.pad_token is None:  # batching needs one; eos is safe because padding is always masked
        tokenizer.pad_token = tokenizer.eos_token
    # LLaVA has no video input: a video part renders as one image placeholder, which the processor then refuses.
    template = extend_chat_template(original.chat_template, token, token)
    tokenizer.chat_template = template
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=settings.select_strategy, chat_template=template,
                               image_token=token, num_additional_image_tokens=settings.extra_tokens)
    return processor, {"image_token": token}, new_ids, len(original)


def tokens_per_image(processor, image: Image.Image) -> int:
    """What the stock LlavaProcessor writes for one image (its own formula, on the processed size)."""
    h, w = processed_size(processor.image_processor, image)
    count = (h // processor.patch_size) * (w // processor.patch_size) + processor.num_additional_image_tokens
    return count - (1 if processor.vision_feature_select_strategy == "default" else 0)


@torch.no_grad()
def feature_rms(donor: PreTrainedModel, image_processor, config: LlavaConfig, seed: int = 0) -> float:
    """RMS of the features the projector will read (the chosen layer, CLS dropped), on two probe images."""
    rng = np.random.default_rng(seed)
    size = config.vision_config.image_size
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
              Image.new("RGB", (size, size), (200, 30, 30))]
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    tower = donor_vision_module(LLAVA, donor)
    hidden = tower(pixel_values=pixels.to(tower.dtype), output_hidden_states=True).hidden_states
    features = hidden[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return features.float().pow(2).mean().sqrt().item()


def gelu_rms() -> float:
    """sqrt(E[gelu(z)²]) for z ~ N(0, 1), by quadrature: the RMS a unit-variance pre-activation leaves after GELU."""
    z = torch.linspace(-10, 10, 200001, dtype=torch.float64)
    density = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(torch.trapezoid(torch.nn.functional.gelu(z) ** 2 * density, z).item())


def projector_init(features_rms: float) -> ConnectorInit:
    """LLaVA-1.5's projector at the LLM's embedding scale, the SmolVLM connector's principle layer by layer.

    linear_1 ~ N(0, (1/(rms_in·√fan_in))²) makes the pre-activations about unit-variance whatever the tower's
    feature scale (CLIP's penultimate layer is far from unit-variance); linear_2 ~ N(0, (RMS(embeddings)/(g·√fan_in))²),
    g the RMS GELU leaves of a unit normal, so image tokens enter the LLM at the RMS of its text embeddings. Biases
    start at zero.
    """
    def layer_std(key, shape, embed_rms):
        first = ".linear_1." in key
        std = 1 / (max(features_rms, 1e-6) * math.sqrt(shape[1])) if first \
            else embed_rms / (gelu_rms() * math.sqrt(shape[1]))
        why = (f"vision features (RMS {features_rms:.3g}) → unit-variance pre-activations" if first
               else "GELU outputs → the LLM's embedding scale")
        return std, f"new {tuple(shape)} projector layer ({shape[1]} → {shape[0]}), N(0, {std:.3g}²): {why}"

    return scaled_normal_init(layer_std)
