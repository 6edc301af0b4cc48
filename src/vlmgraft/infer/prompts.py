"""Conversation + images → model inputs, and the thinking switch and `<think>` blocks of reasoning LLMs.

Conversations are HF chat messages whose content is a string or a list of parts `{"type": "image"}` /
`{"type": "text", "text": ...}` (the internal `Sample` contract); `images` holds one PIL image per image part, in
order. The graft's chat template (the LLM's own, with a prelude for image parts) renders them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmgraft.model.images import ImagePath, image_path_for_inputs

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Files in which `vlmgraft train` (and `vlmgraft merge`, passing it on) records the run's `enable_thinking`.
THINKING_RECORDS = ("vlmgraft_checkpoint.json", "merge_report.json")


@dataclass
class PreparedPrompt:
    """One conversation ready for the engine: token ids with image placeholders expanded and its real tiles."""

    input_ids: list[int]
    pixels: dict[str, torch.Tensor] | None  # the family's pixel inputs (`ImagePath.prompt_pixels`); None: no image
    opens_thinking: bool = False  # the prompt ends inside an open <think> block

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return None if self.pixels is None else self.pixels["pixel_values"]

    @property
    def pixel_attention_mask(self) -> torch.Tensor | None:
        return None if self.pixels is None else self.pixels.get("pixel_attention_mask")


def supports_thinking(processor) -> bool:
    """Whether the chat template has a thinking switch (Qwen3-style `enable_thinking`)."""
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None) or ""
    return "enable_thinking" in str(template)


def recorded_thinking(model_dir) -> bool | None:
    """The `enable_thinking` a model was trained with, as its folder records it; None when nothing is recorded."""
    for name in THINKING_RECORDS:
        path = Path(str(model_dir)).expanduser() / name
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        value = record.get("enable_thinking") if isinstance(record, dict) else None
        if value is None and isinstance(record, dict):  # runs from before the top-level key: the run's own config
            value = ((record.get("config") or {}).get("data_settings") or {}).get("enable_thinking")
        if isinstance(value, bool):
            return value
    return None


def default_thinking(processor, model_dir, explicit: bool | None = None) -> bool | None:
    """What to pass as `enable_thinking`: an explicit choice, else what the model was trained with (None: the
    template's own default, also for templates without a thinking switch)."""
    if explicit is not None:
        return explicit
    return recorded_thinking(model_dir) if supports_thinking(processor) else None


def render_prompt(processor, conversation: list[dict], enable_thinking: bool | None = None,
                  template_kwargs: dict | None = None) -> str:
    """The prompt text with the generation prompt appended; `enable_thinking` is passed only when set."""
    kwargs = dict(template_kwargs or {})
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    return processor.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                                   **kwargs)


def count_image_parts(conversation: list[dict]) -> int:
    return sum(1 for message in conversation if isinstance(message.get("content"), list)
               for part in message["content"] if isinstance(part, dict) and part.get("type") in ("image", "image_url"))


def prepare(processor, conversation: list[dict], images: list, enable_thinking: bool | None = None,
            template_kwargs: dict | None = None, image_path: ImagePath | None = None) -> PreparedPrompt:
    """Render and tokenize one conversation; raises ValueError when image parts and images do not match.
    `image_path`: the model's family (`image_path_for(model)`); None: told by the processor's outputs."""
    parts = count_image_parts(conversation)
    if parts != len(images):
        raise ValueError(f"the conversation has {parts} image part(s) but {len(images)} image(s) were given")
    text = render_prompt(processor, conversation, enable_thinking, template_kwargs)
    if images:
        batch = processor(text=[text], images=[list(images)], return_tensors="pt")
    else:
        batch = processor(text=[text], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    path = image_path if image_path is not None else image_path_for_inputs(batch)
    return PreparedPrompt(ids, path.prompt_pixels(batch), prompt_opens_thinking(text))


def split_reasoning(text: str, opened: bool = False) -> tuple[str, str | None]:
    """(answer, reasoning) from a raw answer: the `<think>…</think>` block moves to reasoning (None if absent).

    `opened`: the prompt already opened the block. A block left open (the answer ran out of tokens while thinking)
    is all reasoning and no answer.
    """
    stripped = text.lstrip()
    if opened and THINK_CLOSE not in text:
        return "", text.strip()
    if THINK_CLOSE in text:
        before, after = text.split(THINK_CLOSE, 1)
        reasoning = before.split(THINK_OPEN, 1)[1] if THINK_OPEN in before else before
        return after.lstrip(), reasoning.strip()
    if stripped.startswith(THINK_OPEN):
        return "", stripped[len(THINK_OPEN):].strip()
    return text, None


class ReasoningSplitter:
    """Streaming version of `split_reasoning`: routes each text delta to reasoning or answer as it arrives.

    `in_think` starts True when the prompt itself opened the block (templates that force thinking). A delta ending
    in a partial tag ("<thi") is held back until the next one shows whether it is a tag.
    """

    def __init__(self, in_think: bool = False) -> None:
        self.in_think = in_think
        self._answer_started = False
        self._strip_leading = in_think
        self._pending = ""
        self._leading = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(reasoning delta, answer delta); pass final=True with the last delta to flush held-back text."""
        text = self._pending + delta
        self._pending = ""
        reasoning, answer = [], []
        while text:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            index = text.find(tag)
            opens_here = not self.in_think and not self._answer_started and not text[:index].strip()
            if index >= 0 and (self.in_think or opens_here):
                if self.in_think:
                    reasoning.append(text[:index])
                self.in_think = not self.in_think
                self._strip_leading = True
                self._leading = ""
                text = text[index + len(tag):]
                continue
            can_open = not self.in_think and not self._answer_started
            keep = _partial_suffix(text, tag) if not final and (self.in_think or can_open) else 0
            body, self._pending = text[:len(text) - keep], text[len(text) - keep:]
            if self.in_think:
                reasoning.append(body)
            elif self._answer_started:
                answer.append(body)
            else:  # whitespace before a possible <think> (or after </think>) waits until real text shows up
                body = self._leading + body
                self._leading = ""
                if self._strip_leading:
                    body = body.lstrip()
                if body.strip() or final:
                    self._answer_started = bool(body.strip())
                    answer.append(body)
                else:
                    self._leading = body
            break
        if final and self._leading and not self.in_think:
            answer.append(self._leading)
            self._leading = ""
        return "".join(reasoning), "".join(answer)


def prompt_opens_thinking(prompt: str) -> bool:
    """True when the rendered prompt ends inside an open `<think>` block (the model continues the reasoning)."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_OPEN)


def _partial_suffix(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
