"""The one internal training/eval sample every reader produces and every collator, trainer and evaluator consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Sample:
    """A chat with its images.

    `messages` are Hugging Face chat messages; a user turn's content is a list of parts `{"type": "image"}` and
    `{"type": "text", "text": ...}`, assistant turns may be plain strings. `images` holds one decoded RGB image per
    `{"type": "image"}` part, in order. `source` names the data set (for per-source counts), `origin` the file and
    row/line the sample came from (for error messages).
    """

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    source: str = ""
    origin: str = ""

    def image_parts(self) -> int:
        return sum(1 for m in self.messages if isinstance(m.get("content"), list)
                   for p in m["content"] if p.get("type") == "image")
