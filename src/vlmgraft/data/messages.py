"""OpenAI / Hugging Face chat jsonl: `{"messages": [{"role", "content"}], "images"?: [...]}`.

Content is a string or a list of parts: `{"type": "text", "text"}`, `{"type": "image", "image"|"path"|"url": ...}`,
`{"type": "image_url", "image_url": {"url": ...}}` (a path, `file://` URL or `data:` URL), or a bare
`{"type": "image"}` that takes the next entry of the row's `images` column. String content may hold `<image>` tags
that also take entries of `images` in order. Paths are relative to the jsonl file. System, assistant and `tool`
messages keep their other keys (`tool_calls`, `reasoning_content` …) for the chat template to render.
"""

from __future__ import annotations

from vlmgraft.data.jsonl import JsonlSource
from vlmgraft.data.source import IMAGE_TAG, RowRejected, split_image_tags


def _inline_image(part: dict):
    """The image a part carries itself, or None for a placeholder that takes the next `images` entry."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "path", "url"):
        if part.get(key):
            return part[key]
    return None


def _text_only(content, origin: str, turn: int) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise RowRejected(origin, f"message {turn}: only user turns may hold {part.get('type')!r} parts")
        texts.append(part.get("text") or "")
    return "".join(texts)


class MessagesSource(JsonlSource):
    format = "messages"

    def parse(self, row: dict, origin: str) -> tuple[list[dict], list]:
        raw_messages = row.get("messages")
        if not isinstance(raw_messages, list):
            raise RowRejected(origin, f"field 'messages' must be a list (keys found: {sorted(row)})")
        column = row.get("images") or []
        if isinstance(column, str):
            column = [column]
        if not isinstance(column, list):
            raise RowRejected(origin, "field 'images' must be a list")
        messages, refs, taken = [], [], 0
        for turn, message in enumerate(raw_messages):
            if not isinstance(message, dict):
                raise RowRejected(origin, f"message {turn} is not an object")
            role, content = message.get("role"), message.get("content")
            if content is None:
                content = ""
            if not isinstance(content, (str, list)) or isinstance(content, list) and not all(
                    isinstance(p, dict) for p in content):
                raise RowRejected(origin, f"message {turn}: content must be a string or a list of parts")
            if role != "user":  # keep tool_calls, reasoning_content, names: the template renders them
                messages.append({**message, "content": _text_only(content, origin, turn)})
                continue
            parts = split_image_tags(content) if isinstance(content, str) else content
            converted = []
            for part in parts:
                kind = part.get("type")
                if kind == "text":
                    converted.append({"type": "text", "text": part.get("text") or ""})
                elif kind in ("image", "image_url"):
                    inline = _inline_image(part)
                    if inline is None:
                        if taken >= len(column):
                            raise RowRejected(origin, f"message {turn}: more image placeholders than the "
                                                      f"{len(column)} entries of 'images'")
                        inline, taken = column[taken], taken + 1
                    refs.append(inline)
                    converted.append({"type": "image"})
                else:
                    raise RowRejected(origin, f"message {turn}: unsupported content part type {kind!r}")
            messages.append({"role": "user", "content": converted})
        if taken != len(column):
            raise RowRejected(origin, f"{taken} image placeholder(s) ({IMAGE_TAG} tags or bare image parts) but "
                                      f"{len(column)} entries in 'images'")
        return messages, refs
