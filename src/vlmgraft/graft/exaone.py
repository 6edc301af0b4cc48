"""Qwen2.5-VL donors → a stock `Exaone4_5_ForConditionalGeneration`: Qwen2.5-VL's ViT in front of any causal LM.

Exaone 4.5's vision tower is the Qwen2.5-VL ViT (window attention, fused qkv, the same `model.visual.*` keys) with
grouped-query attention made configurable, and its text model is built from `text_config` through AutoModel, so
the LLM's own class runs (Qwen3Model with q/k-norm) with its own 1-D RoPE: Exaone feeds plain 1-D text positions,
Qwen2.5-VL's M-RoPE is not used. What the graft settles:

- vision `num_key_value_heads` = `num_heads` (Qwen2.5-VL's qkv is plain multi-head; the class default is 8);
- the patch merger is the connector: its RMSNorm `ln_q` and first MLP layer act on the ViT's width and are kept;
  the output layer `mlp.2` wrote into the donor LLM's embedding space and is re-initialised at the LLM's width;
- `image_token_id`/`video_token_id` are the LLM's `<|image_pad|>`/`<|video_pad|>` (added when it lacks them), and
  the template writes `<|vision_start|><|image_pad|><|vision_end|>` when the LLM has the markers (else the
  placeholder alone, to add no untrained rows);
- the processor is a stock `Exaone4_5_Processor` with the donor's image and video processors (its min/max pixels).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    Exaone4_5_Config,
    Exaone4_5_Processor,
    PretrainedConfig,
    PreTrainedModel,
)

from vlmgraft import hub
from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import EXAONE4_5
from vlmgraft.graft.surgery import ConnectorInit, scaled_normal_init
from vlmgraft.graft.template import extend_chat_template

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# Qwen2.5-VL's vision config fields Exaone's does not take (tokens_per_second times video M-RoPE positions).
_DROPPED_VISION_FIELDS = ("model_type", "tokens_per_second", "transformers_version", "architectures")


def exaone_config(donor_config: PretrainedConfig, llm_config: PretrainedConfig, image_token_id: int,
                  video_token_id: int, vocab_size: int) -> Exaone4_5_Config:
    """Outer config: the donor's ViT settings (merger output at the LLM's width) and the LLM's own config."""
    vision = {k: v for k, v in donor_config.vision_config.to_dict().items() if k not in _DROPPED_VISION_FIELDS}
    vision["out_hidden_size"] = llm_config.hidden_size
    vision["num_key_value_heads"] = vision["num_heads"]
    text = llm_config.to_dict()
    text["vocab_size"] = vocab_size
    tied = bool(getattr(llm_config, "tie_word_embeddings", False))
    config = Exaone4_5_Config(vision_config=vision, text_config=text, image_token_id=image_token_id,
                              video_token_id=video_token_id, tie_word_embeddings=tied,
                              pad_token_id=getattr(llm_config, "pad_token_id", None))
    config.architectures = [EXAONE4_5.export_architecture]
    return config


def make_processor(llm: str, vision: str, donor_processor, image_token: str | None):
    """Exaone4_5_Processor: the donor's image/video processors + the LLM's tokenizer and template (prelude added)."""
    original = hub.load(AutoTokenizer.from_pretrained, llm, "LLM tokenizer")
    if not original.chat_template:
        raise VlmgraftError(f"the LLM tokenizer of {llm!r} has no chat_template; use an instruct/chat model or add "
                            f"a chat_template to its tokenizer_config.json")
    old_vocab = original.get_vocab()
    tokens = {"image_token": image_token or IMAGE_TOKEN, "video_token": VIDEO_TOKEN}
    tokenizer = hub.load(AutoTokenizer.from_pretrained, llm, "LLM tokenizer", extra_special_tokens=tokens)
    new_ids = sorted(tokenizer.convert_tokens_to_ids(t) for t in set(tokens.values()) if t not in old_vocab)
    if tokenizer.pad_token is None:  # batching needs one; eos is safe because padding is always masked
        tokenizer.pad_token = tokenizer.eos_token
    wrap = VISION_START in old_vocab and VISION_END in old_vocab
    image, video = ((f"{VISION_START}{t}{VISION_END}" if wrap else t) for t in tokens.values())
    template = extend_chat_template(original.chat_template, image, video)
    tokenizer.chat_template = template
    video_processor = getattr(donor_processor, "video_processor", None)
    if video_processor is None:  # Exaone4_5_Processor cannot be built without one
        raise VlmgraftError(f"the vision donor {vision!r} has no video processor; add its "
                            f"video_preprocessor_config.json (Qwen2VLVideoProcessor)")
    processor = Exaone4_5_Processor(image_processor=donor_processor.image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=template)
    return processor, {**tokens, **({"vision_start": VISION_START, "vision_end": VISION_END} if wrap else {})}, \
        new_ids, len(original)


def token_range(processor) -> dict:
    """Image tokens per image: one per merged patch unit, so it varies with the size between min and max pixels."""
    image_processor = processor.image_processor
    unit = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size
    return {"per_image": "(height/unit)·(width/unit) after resizing into [min_pixels, max_pixels]",
            "unit_px": unit, "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"],
            "min_tokens": max(1, size["shortest_edge"] // unit**2), "max_tokens": size["longest_edge"] // unit**2}


def probe_side(image_processor) -> int:
    """A square side the processor keeps as is: a whole number of merged units inside [min_pixels, max_pixels]."""
    unit = image_processor.patch_size * image_processor.merge_size
    return max(2, math.ceil(math.sqrt(image_processor.size["shortest_edge"]) / unit)) * unit


@torch.no_grad()
def merger_hidden_rms(donor: PreTrainedModel, donor_processor, seed: int = 0) -> float:
    """RMS of what the re-initialised merger output layer reads: GELU(mlp.0(ln_q(patches))), on two probe images."""
    rng = np.random.default_rng(seed)
    side = probe_side(donor_processor.image_processor)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)),
              Image.new("RGB", (side, side), (200, 30, 30))]
    batch = donor_processor.image_processor(images=images, return_tensors="pt")
    visual = donor.model.visual
    seen = []
    handle = visual.merger.mlp[-1].register_forward_pre_hook(lambda _, args: seen.append(args[0].float()))
    try:
        visual(batch["pixel_values"].to(visual.dtype), grid_thw=batch["image_grid_thw"])
    finally:
        handle.remove()
    return seen[0].pow(2).mean().sqrt().item()


def merger_output_init(hidden_rms: float) -> ConnectorInit:
    """The merger's new output layer at the LLM's embedding scale: N(0, (RMS(embeddings)/(rms_in·√fan_in))²), so
    image tokens enter the LLM at the RMS of its text embeddings (the SmolVLM connector's principle); bias zero."""
    def layer_std(key, shape, embed_rms):
        std = embed_rms / (max(hidden_rms, 1e-6) * math.sqrt(shape[1]))
        return std, (f"new {tuple(shape)} merger output layer ({shape[1]} → LLM {shape[0]}), N(0, {std:.3g}²): "
                     f"merger activations (RMS {hidden_rms:.3g}) → the LLM's embedding scale")

    return scaled_normal_init(layer_std)


def connector_split(ledger) -> dict:
    """Which connector tensors came from the donor and which are new (for graft_report.json)."""
    prefix = EXAONE4_5.connector + "."
    return {"kept_from_donor": sorted(k for k in ledger.copied if k.startswith(prefix)),
            "reinitialised": sorted(k for k in ledger.reinitialised if k.startswith(prefix))}


def check_vision_settings(report, graft, processor) -> None:
    """Vision config, processors and token ids agree with each other and with the LLM's width."""
    cfg, vision = graft.config, graft.config.vision_config
    tok = processor.tokenizer
    problems = []
    if vision.num_key_value_heads != vision.num_heads:
        problems.append(f"vision num_key_value_heads {vision.num_key_value_heads} != num_heads {vision.num_heads}")
    if vision.out_hidden_size != cfg.text_config.hidden_size:
        problems.append(f"merger out {vision.out_hidden_size} != LLM hidden {cfg.text_config.hidden_size}")
    video_ids = {cfg.video_token_id, processor.video_token_id, tok.convert_tokens_to_ids(processor.video_token)}
    if len(video_ids) != 1:
        problems.append(f"video_token_id disagrees: {sorted(video_ids)}")
    for name, proc in (("image", processor.image_processor), ("video", processor.video_processor)):
        got = (proc.patch_size, proc.merge_size, proc.temporal_patch_size)
        want = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        if got != want:
            problems.append(f"{name} processor (patch, merge, temporal) {got} != vision config {want}")
    report.add("vision settings agree", not problems,
               "; ".join(problems) or f"kv heads = heads = {vision.num_heads}, merger → {vision.out_hidden_size}, "
               f"video_token_id {cfg.video_token_id}, processors match patch {vision.patch_size}×merge "
               f"{vision.spatial_merge_size}")
