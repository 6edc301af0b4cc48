"""ms-swift's query/response jsonl: `{"system"?, "history"?: [[q, a], ...], "query", "response", "images"?: [...]}`.

`<image>` tags in the history questions and the query mark where images go, in order; their count must equal the
number of `images` or the row is rejected with its line number. Image paths are relative to the jsonl file.
"""

from __future__ import annotations

from vlmgraft.data.jsonl import JsonlSource
from vlmgraft.data.source import IMAGE_TAG, RowRejected, count_image_tags, user_turn


class SwiftSource(JsonlSource):
    format = "swift"

    def parse(self, row: dict, origin: str) -> tuple[list[dict], list]:
        for key in ("query", "response"):
            if not isinstance(row.get(key), str):
                raise RowRejected(origin, f"field {key!r} must be a string (keys found: {sorted(row)})")
        history = row.get("history") or []
        if not isinstance(history, list) or not all(
                isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
                for pair in history):
            raise RowRejected(origin, "field 'history' must be a list of [question, answer] string pairs")
        images = row.get("images") or []
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list):
            raise RowRejected(origin, "field 'images' must be a list of paths")
        pairs = [*history, (row["query"], row["response"])]
        tags = sum(count_image_tags(question) for question, _ in pairs)
        if any(IMAGE_TAG in answer for _, answer in pairs):
            raise RowRejected(origin, f"{IMAGE_TAG} tag in an answer; images belong in questions")
        if tags != len(images):
            raise RowRejected(origin, f"{tags} {IMAGE_TAG} tag(s) but {len(images)} image(s) in 'images'")
        messages = []
        if isinstance(row.get("system"), str) and row["system"]:
            messages.append({"role": "system", "content": row["system"]})
        for question, answer in pairs:
            messages.append(user_turn(question))
            messages.append({"role": "assistant", "content": answer})
        return messages, images
