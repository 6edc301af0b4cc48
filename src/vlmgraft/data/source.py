"""What every reader is: a `Source` of rows that turns one row into one `Sample`, plus the helpers readers share.

A source is indexed cheaply in the main process (rows validated, images not decoded), then rows are fetched by
index (`raw`) or streamed (`iter_raw`) and decoded into Samples inside DataLoader workers (`to_sample`). A row that
cannot be used raises `RowRejected` (bad structure, with its file and line/row) or `ImageSkipped` (bad image); callers
count both and carry on.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmgraft.data.images import DEFAULT_POLICY, ImagePolicy, skipping
from vlmgraft.data.sample import Sample
from vlmgraft.images import load_image

IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant", "tool")


class RowRejected(Exception):
    """A row whose structure is unusable; `origin` is "file:line" (jsonl) or "file[row]" (tables)."""

    def __init__(self, origin: str, message: str):
        self.origin, self.message = origin, message
        super().__init__(f"{origin}: {message}")


class Source(ABC):
    """One data set (one file, folder, subset or hub split) of one format."""

    format: str = ""

    def __init__(self, path: str | Path, name: str, policy: ImagePolicy = DEFAULT_POLICY):
        self.path = str(path)
        self.name = name
        self.policy = policy
        self.problems: list[RowRejected] = []  # rows rejected while indexing

    @abstractmethod
    def __len__(self) -> int:
        """Usable rows (streaming sources may count rows without validating them)."""

    @abstractmethod
    def raw(self, index: int) -> Any:
        """The undecoded row `index` (cheap: no image is decoded)."""

    @abstractmethod
    def iter_raw(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, Any]]:
        """`(index, raw row)` for this shard's rows, in storage order, reading only what this shard needs."""

    @abstractmethod
    def to_sample(self, index: int, raw: Any) -> Sample:
        """Decode one row (raises RowRejected or ImageSkipped)."""

    def origin(self, index: int) -> str:
        return f"{self.path}[{index}]"

    def get(self, index: int) -> Sample:
        return self.to_sample(index, self.raw(index))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.path!r})"


def split_image_tags(text: str, tag: str = IMAGE_TAG) -> list[dict]:
    """'<image>What is it?' → [{"type": "image"}, {"type": "text", "text": "What is it?"}] (empty text dropped)."""
    parts: list[dict] = []
    for i, piece in enumerate(text.split(tag)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def count_image_tags(text: str, tag: str = IMAGE_TAG) -> int:
    return len(re.findall(re.escape(tag), text))


def decode_images(refs: list, base_dir: Path | None, policy: ImagePolicy, origin: str) -> list:
    """Decode every image reference of a row; an ImageSkipped names the row as well as the image."""
    with skipping(origin):
        return [load_image(ref, policy, base_dir) for ref in refs]


def check_conversation(messages: list[dict], n_images: int, origin: str) -> None:
    """The invariants a Sample needs: known roles, an assistant turn, image parts only in user turns, counts match."""
    if not messages:
        raise RowRejected(origin, "empty conversation")
    image_parts = 0
    for turn, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise RowRejected(origin, f"message {turn} has role {role!r}; expected one of {list(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            images_here = sum(1 for p in content if p.get("type") == "image")
            if images_here and role != "user":
                raise RowRejected(origin, f"message {turn} ({role}) holds an image; only user turns may")
            image_parts += images_here
        elif not isinstance(content, str):
            raise RowRejected(origin, f"message {turn} content is {type(content).__name__}; expected text or parts")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowRejected(origin, "no assistant turn to learn from")
    if image_parts != n_images:
        raise RowRejected(origin, f"{image_parts} image placeholder(s) but {n_images} image(s)")


def user_turn(text_or_parts: str | list[dict]) -> dict:
    parts = split_image_tags(text_or_parts) if isinstance(text_or_parts, str) else text_or_parts
    return {"role": "user", "content": parts}
