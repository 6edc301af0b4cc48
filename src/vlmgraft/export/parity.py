"""Logit parity: a few fixed prompts with images, run through two models, compared by scale-relative max |Δ|.

Merging and exporting must not change what the model computes. Every check here feeds the same inputs to a reference
and a candidate and reports max |Δ| over all logits divided by max |reference logit|, so one tolerance works for
tiny random models and real ones alike.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PROMPTS = ("What is in the image?", "图中有几个红色的圆？")
TEXT_PROMPT = "Say hello in one word."


def synthetic_images() -> list[Image.Image]:
    """Two deterministic pictures of different sizes and aspect ratios (so multi-tile splitting is exercised)."""
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    wide[8:24, 8:40] = (220, 30, 30)
    square = np.zeros((40, 40, 3), dtype=np.uint8)
    square[:, :20] = (30, 30, 220)
    square[10:30, 10:30] = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    return [Image.fromarray(wide), Image.fromarray(square)]


def render(processor, messages: list[dict]) -> str:
    kwargs = {"enable_thinking": False} if "enable_thinking" in (processor.chat_template or "") else {}
    return processor.apply_chat_template(messages, add_generation_prompt=True, **kwargs)


def parity_inputs(processor) -> list[dict]:
    """One batch per prompt: two with an image each and one text-only."""
    batches = []
    for prompt, image in zip(PROMPTS, synthetic_images(), strict=True):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        batches.append(dict(processor(text=[render(processor, messages)], images=[[image]], return_tensors="pt")))
    text = render(processor, [{"role": "user", "content": [{"type": "text", "text": TEXT_PROMPT}]}])
    batches.append(dict(processor(text=[text], return_tensors="pt")))
    return batches


@torch.no_grad()
def logits_for(model, batches: list[dict]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    for batch in batches:
        moved = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in moved:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        out.append(model(**moved).logits.float().cpu())
    return out


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], tolerance: float) -> dict:
    max_abs = max(float((r - c).abs().max()) for r, c in zip(reference, candidate, strict=True))
    scale = max(float(r.abs().max()) for r in reference) or 1.0
    same_argmax = all(torch.equal(r.argmax(-1), c.argmax(-1)) for r, c in zip(reference, candidate, strict=True))
    return {"max_abs_diff": max_abs, "relative_diff": max_abs / scale, "tolerance": tolerance,
            "same_argmax": same_argmax, "passed": max_abs / scale <= tolerance, "samples": len(reference)}
