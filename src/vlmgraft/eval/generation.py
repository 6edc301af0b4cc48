"""Batched greedy answers for evaluation: left padding, one processor call per batch, a progress bar.

Evaluation needs only "prompt in, greedy text out" for many samples; the interactive/serving helpers in
`vlmgraft.infer` add streaming and sampling this does not need, so this stays a small self-contained loop.
A batch never mixes samples with and without images (the SmolVLM processor takes images for all or none).
"""

from __future__ import annotations

import re

import torch
from PIL import Image
from tqdm.auto import tqdm

from vlmgraft.data.sample import Sample

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def split_sample(sample: Sample) -> tuple[list[dict], str]:
    """The conversation without its final assistant answer, and that answer's text (the reference)."""
    messages = list(sample.messages)
    reference = ""
    if messages and messages[-1].get("role") == "assistant":
        content = messages.pop()["content"]
        reference = content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content if p.get("type") == "text")
    return messages, reference


def render_prompt(template_owner, messages: list[dict]) -> str:
    """Chat template with the generation prompt; thinking switched off where the template knows the switch."""
    template = getattr(template_owner, "chat_template", None) or ""
    kwargs = {"enable_thinking": False} if "enable_thinking" in template else {}
    return template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


def clean_answer(text: str) -> str:
    return _THINK.sub("", text).strip()


def _batches(items: list[int], has_images: list[bool], batch_size: int) -> list[list[int]]:
    batches = []
    for kind in (True, False):
        chosen = [i for i in items if has_images[i] == kind]
        batches += [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    return batches


def _generation_kwargs(tokenizer, max_new_tokens: int) -> dict:
    # Explicit greedy settings: the model's generation_config may ask for sampling (Qwen3 does).
    return dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


@torch.no_grad()
def generate_tokens(model, processor, conversations: list[list[dict]], images: list[list[Image.Image]] | None = None,
                    batch_size: int = 8, max_new_tokens: int = 64, desc: str = "generating") -> list[list[int]]:
    """Greedy new-token ids for each conversation (ending in a user turn), in input order, padding removed."""
    images = images or [[] for _ in conversations]
    prompts = [render_prompt(processor, messages) for messages in conversations]
    results: list[list[int]] = [[] for _ in prompts]
    tokenizer = getattr(processor, "tokenizer", processor)
    kwargs = _generation_kwargs(tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    progress = tqdm(total=len(prompts), desc=desc, leave=False)
    for batch_ids in _batches(list(range(len(prompts))), [bool(im) for im in images], batch_size):
        texts = [prompts[i] for i in batch_ids]
        extra = {"images": [images[i] for i in batch_ids]} if images[batch_ids[0]] else {}
        inputs = processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **extra)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        output = model.generate(**inputs, **kwargs)
        for index, row in zip(batch_ids, output[:, inputs["input_ids"].shape[1]:].tolist(), strict=True):
            while row and row[-1] == kwargs["pad_token_id"]:  # finished early: the rest is padding
                row.pop()
            results[index] = row
        progress.update(len(batch_ids))
    progress.close()
    return results


def generate_answers(model, processor, conversations: list[list[dict]], images: list[list[Image.Image]] | None = None,
                     batch_size: int = 8, max_new_tokens: int = 64, desc: str = "generating") -> list[str]:
    """Greedy answer texts (special tokens and any <think> block removed), in input order."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = generate_tokens(model, processor, conversations, images, batch_size, max_new_tokens, desc)
    return [clean_answer(text) for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def answer_samples(model, processor, samples: list[Sample], batch_size: int = 8, max_new_tokens: int = 64,
                   desc: str = "generating", images: list[list[Image.Image]] | None = None) -> list[str]:
    """Greedy answers to samples' prompts; `images` replaces the samples' own images (the vision ablation)."""
    conversations = [split_sample(s)[0] for s in samples]
    return generate_answers(model, processor, conversations, images if images is not None else
                            [s.images for s in samples], batch_size, max_new_tokens, desc)


@torch.no_grad()
def first_step_logits(model, tokenizer_or_processor, conversations: list[list[dict]]) -> list[torch.Tensor]:
    """Next-token logits after each text-only prompt, one prompt at a time (no padding to blur the comparison)."""
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    device = next(model.parameters()).device
    out = []
    for messages in conversations:
        ids = tokenizer(render_prompt(tokenizer_or_processor, messages), return_tensors="pt",
                        add_special_tokens=False)
        out.append(model(**{k: v.to(device) for k, v in ids.items()}).logits[0, -1].float().cpu())
    return out
