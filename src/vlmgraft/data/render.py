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

Reasoning written inline (`<think>…</think>` at the start of `content`) gets a marker of its own in the skeleton,
with the `<think>` tags and whitespace around it kept, and the answer after `</think>` another. A template that moves
the block out of `content` (Qwen3 re-renders it in its own think block, or drops it from turns before the last user
query) then does the same to the skeleton, and the reasoning is trained from its `<think>` on wherever it lands.
An empty answer (only tool calls, say) ends at its turn's closing string: templates format what follows an empty
content differently from what follows a marker (Qwen3 writes no newline before a tool call then). A turn whose span
still cannot be found is counted in `Rendered.unaligned` (the encoder rejects the sample, naming the cause) rather
than silently left untrained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARK = "\u27eavg:{}\u27eb"  # ⟪vg:3⟫ — no template trims or escapes these characters
MARK_RE = re.compile("\u27eavg:(\\d+)\u27eb")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # [start, end) character ranges that carry loss (assistant turns)
    unaligned: int = 0  # assistant turns the template rendered but whose text could not be located


def inline_reasoning(content: str) -> tuple[int, int, int] | None:
    """(start, end) of the reasoning text inside a leading `<think>…</think>` of `content`, and where the answer after
    it starts, all without surrounding whitespace; None without a non-empty reasoning. Cut as Qwen3's template cuts:
    the reasoning lies between the last `<think>` before the first `</think>` and that `</think>`, and the answer
    follows the last `</think>`."""
    close = content.find(THINK_CLOSE)
    if close < 0:
        return None
    opened = content.rfind(THINK_OPEN, 0, close)
    start = opened + len(THINK_OPEN) if opened >= 0 else 0
    reasoning = content[start:close]
    if not reasoning.strip():
        return None  # an empty block: the template's own empty block looks the same, the content needs no split
    start += len(reasoning) - len(reasoning.lstrip())
    end = start + len(reasoning.strip())
    after = content.rfind(THINK_CLOSE) + len(THINK_CLOSE)
    answer = after + len(content[after:]) - len(content[after:].lstrip())
    return start, end, answer


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
        skeleton_messages, slots = [], []  # slots[k]: (assistant message, "reasoning" | "answer", its text)
        for message in messages:
            if message["role"] != "assistant":
                skeleton_messages.append(message)
                continue
            content = flatten_text(message.get("content"))
            cut = None if message.get("reasoning_content") else inline_reasoning(content)
            if cut is None:
                skeleton = self._marker(slots, message, "answer", content)
            else:
                start, end, answer = cut
                skeleton = (content[:start] + self._marker(slots, message, "reasoning", content[start:end])
                            + content[end:answer] + self._marker(slots, message, "answer", content[answer:]))
            skeleton = [{"type": "text", "text": skeleton}] if self.parts else skeleton
            skeleton_messages.append({**message, "content": skeleton})
        pieces = MARK_RE.split(self.apply(skeleton_messages))
        # pieces = [before_0, "0", between_0_1, "1", ..., after_last]
        template_text, found = pieces[0::2], [slots[int(k)] for k in pieces[1::2]]
        spans = self._align(text, template_text, found)
        return Rendered(text, spans, sum(1 for _, kind, _ in found if kind == "answer") - len(spans))

    @staticmethod
    def _marker(slots: list, message: dict, kind: str, text: str) -> str:
        slots.append((message, kind, text))
        return MARK.format(len(slots) - 1)

    def _align(self, text: str, template_text: list[str], slots: list[tuple[dict, str, str]]
               ) -> list[tuple[int, int]]:
        spans, pos, reasoning_start = [], 0, None
        template_text = list(template_text)
        for k, (turn, kind, piece) in enumerate(slots):
            before, after = template_text[k], template_text[k + 1]
            if not text.startswith(before, pos):
                break  # the template rendered something unexpected; keep the spans found so far
            start = pos + len(before)
            think = before.rfind(THINK_OPEN)
            if kind == "answer" and not piece.strip():  # see the module docstring: up to its closing string
                closing = text.find(self.closing, start) if self.closing and self.closing in after else -1
                if closing < 0:
                    break
                spans.append((self._loss_start(turn, start, pos + think if think >= 0 else None, reasoning_start),
                              closing + len(self.closing)))
                template_text[k + 1] = after[after.find(self.closing) + len(self.closing):]
                pos = closing + len(self.closing)
                continue
            if k + 1 < len(slots):
                end = text.find(after, start) if after else -1
            else:
                end = len(text) - len(after) if text.endswith(after) else -1
            if end < start:
                break
            if kind == "reasoning":  # the turn's span starts at its <think>; its answer marker closes the span
                reasoning_start = (id(turn), pos + think if think >= 0 else start)
                pos = end
                continue
            closing = after.find(self.closing) if self.closing else -1
            loss_end = end + closing + len(self.closing) if closing >= 0 else end
            spans.append((self._loss_start(turn, start, pos + think if think >= 0 else None, reasoning_start),
                          loss_end))
            pos = end
        return spans

    @staticmethod
    def _loss_start(turn: dict, start: int, think: int | None, reasoning_start: tuple | None) -> int:
        """Where an answer's span starts: at its inline reasoning's <think>, at the template's <think> when the turn
        has `reasoning_content`, else at the answer itself."""
        if reasoning_start is not None and reasoning_start[0] == id(turn):
            return reasoning_start[1]
        if turn.get("reasoning_content") and think is not None:
            return think
        return start
