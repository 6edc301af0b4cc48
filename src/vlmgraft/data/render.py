"""Render a conversation with the graft's chat template and find, in characters, what the assistant said.

The LLM's template has no `{% generation %}` markers, and templates rewrite turns (Qwen3 adds an empty
`<think>\\n\\n</think>\\n\\n` to the last assistant turn and strips reasoning from earlier ones; Llama 3 trims content),
so assistant text cannot be found by searching for the message strings. Instead the conversation is rendered twice:
once as is and once with every assistant content replaced by a unique marker. The text between markers in the second
rendering is exactly the template's own text around each answer, so aligning the two renderings locates every
answer however the template decorates it.

A loss span is the answer as rendered plus everything after it up to and including the turn's closing string
(`<|im_end|>`, `<|eot_id|>` …, learned from a probe rendering): tool calls the template writes after the content are
the assistant's too, and the closing token teaches the model to stop. The template's own prefix of the turn (role
header, the empty think block) carries no loss; a non-empty `reasoning_content` does, from its `<think>` on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARK = "\u27eavg:{}\u27eb"  # ⟪vg:3⟫ — no template trims or escapes these characters
MARK_RE = re.compile("\u27eavg:(\\d+)\u27eb")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # [start, end) character ranges that carry loss (assistant turns)


def flatten_text(content) -> str:
    """Content parts → plain text (assistant and system turns; images never appear there)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def normalise(messages: list[dict], parts: bool = False) -> list[dict]:
    """User turns keep their parts; other turns get plain-string content, which LLM templates expect — or, with
    `parts`, a single text part, which VLM templates that only iterate content parts (SmolVLM's own) expect."""
    out = []
    for message in messages:
        if message["role"] == "user" and isinstance(message.get("content"), list):
            out.append(message)
        else:
            text = flatten_text(message.get("content"))
            out.append({**message, "content": [{"type": "text", "text": text}] if parts else text})
    return out


class ChatRenderer:
    """`render(messages) -> Rendered` for one processor (or tokenizer) and fixed template options."""

    def __init__(self, processor, **template_kwargs):
        # The tokenizer renders the processor's template: the processor's own apply_chat_template would treat
        # template switches it does not recognise as processing kwargs (and warn).
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        self.template_kwargs = template_kwargs
        self.parts = self._needs_parts()
        self.closing = self._closing_string()

    def apply(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=False, **self.template_kwargs)

    def _needs_parts(self) -> bool:
        """True when the template drops string content (it only loops over content parts)."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                 {"role": "assistant", "content": MARK.format(0)}]
        return MARK.format(0) not in self.apply(probe)

    def _closing_string(self) -> str:
        """What the template writes right after an answer, minus trailing whitespace (e.g. `<|im_end|>`)."""
        probe = normalise([{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                           {"role": "assistant", "content": MARK.format(0)}], self.parts)
        rendered = self.apply(probe)
        at = rendered.find(MARK.format(0))
        return rendered[at + len(MARK.format(0)):].rstrip() if at >= 0 else ""

    def render(self, messages: list[dict], loss_on: str = "assistant") -> Rendered:
        messages = normalise(messages, self.parts)
        text = self.apply(messages)
        if loss_on == "all":
            return Rendered(text, [(0, len(text))])
        skeleton_messages, turns = [], []
        for message in messages:
            if message["role"] == "assistant":
                marker = MARK.format(len(turns))
                content = [{"type": "text", "text": marker}] if self.parts else marker
                skeleton_messages.append({**message, "content": content})
                turns.append(message)
            else:
                skeleton_messages.append(message)
        pieces = MARK_RE.split(self.apply(skeleton_messages))
        # pieces = [before_0, "0", between_0_1, "1", ..., after_last]
        template_text, found = pieces[0::2], [int(k) for k in pieces[1::2]]
        return Rendered(text, self._align(text, template_text, [turns[k] for k in found]))

    def _align(self, text: str, template_text: list[str], turns: list[dict]) -> list[tuple[int, int]]:
        spans, pos = [], 0
        for k, turn in enumerate(turns):
            before, after = template_text[k], template_text[k + 1]
            if not text.startswith(before, pos):
                break  # the template rendered something unexpected; keep the spans found so far
            start = pos + len(before)
            if k + 1 < len(turns):
                end = text.find(after, start) if after else -1
            else:
                end = len(text) - len(after) if text.endswith(after) else -1
            if end < start:
                break
            loss_start = start
            if turn.get("reasoning_content") and (think := before.rfind("<think>")) >= 0:
                loss_start = pos + think
            closing = after.find(self.closing) if self.closing else -1
            loss_end = end + closing + len(self.closing) if closing >= 0 else end
            spans.append((loss_start, loss_end))
            pos = end
        return spans
