"""A line-indexed jsonl file: rows validated once, then fetched by byte offset, so memory stays at 12 bytes a row.

Holding parsed rows as Python objects would copy-on-write into every forked DataLoader worker (the well-known
"dataset leaks memory" effect); an offsets array does not. Rows that fail to parse or validate are rejected with
their 1-based line number and kept in `problems`.
"""

from __future__ import annotations

import json
import os
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlmgraft.data.images import DEFAULT_POLICY, ImagePolicy
from vlmgraft.data.sample import Sample
from vlmgraft.data.source import RowRejected, Source, check_conversation, decode_images
from vlmgraft.errors import VlmgraftError


class JsonlSource(Source):
    """Subclasses implement `parse(row, origin) -> (messages, image_refs)`, raising RowRejected on bad rows."""

    def __init__(self, path: str | Path, name: str | None = None, policy: ImagePolicy = DEFAULT_POLICY,
                 streaming: bool = False):
        path = Path(path)
        if not path.is_file():
            raise VlmgraftError(f"data file {str(path)!r} does not exist")
        super().__init__(path, name or path.stem, policy)
        self.base_dir = path.parent
        self.streaming = streaming
        self._handle = None
        self._handle_pid = None
        if streaming:
            self._offsets, self._lines = None, None
            self._count = _count_rows(path)
        else:
            self._offsets, self._lines = self._index(path)
            self._count = len(self._offsets)

    @abstractmethod
    def parse(self, row: dict, origin: str) -> tuple[list[dict], list]:
        """Row → (Sample messages, image references in order). Raise RowRejected for unusable rows."""

    def _index(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        offsets, lines = [], []
        with path.open("rb") as handle:
            offset, number = 0, 0
            for line in handle:
                number += 1
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                origin = f"{path}:{number}"
                try:
                    self._checked(self._loads(line, origin), origin)
                except RowRejected as err:
                    self.problems.append(err)
                    continue
                offsets.append(start)
                lines.append(number)
        if not offsets and self.problems:
            first = self.problems[0]
            raise VlmgraftError(f"no usable row in {str(path)!r}; first problem: {first}")
        return np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int32)

    @staticmethod
    def _loads(line: bytes, origin: str) -> dict:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RowRejected(origin, f"not valid JSON ({err})") from err
        if not isinstance(row, dict):
            raise RowRejected(origin, f"a row must be a JSON object, got {type(row).__name__}")
        return row

    def _checked(self, row: dict, origin: str) -> tuple[list[dict], list]:
        messages, refs = self.parse(row, origin)
        check_conversation(messages, len(refs), origin)
        return messages, refs

    def __len__(self) -> int:
        return self._count

    def origin(self, index: int) -> str:
        line = self._lines[index] if self._lines is not None else index + 1
        return f"{self.path}:{line}"

    def raw(self, index: int) -> dict:
        if self._offsets is None:
            raise VlmgraftError(f"{self.path} was opened for streaming; random access needs streaming=False")
        if self._handle is None or self._handle_pid != os.getpid():  # one handle per worker process
            self.close()  # a forked worker's copy of its parent's handle
            self._handle, self._handle_pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115
        self._handle.seek(int(self._offsets[index]))
        return {"line": int(self._lines[index]), "row": self._loads(self._handle.readline(), self.origin(index))}

    def iter_raw(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, dict]]:
        index = 0
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if index % num_shards == shard:
                    origin = f"{self.path}:{number}"
                    try:
                        row = self._loads(line, origin)
                    except RowRejected as err:
                        yield index, {"line": number, "error": err}
                    else:
                        yield index, {"line": number, "row": row}
                index += 1

    def to_sample(self, index: int, raw: dict) -> Sample:
        origin = f"{self.path}:{raw['line']}"
        if "error" in raw:
            raise raw["error"]
        messages, refs = self._checked(raw["row"], origin)
        images = decode_images(refs, self.base_dir, self.policy, origin)
        return Sample(messages=messages, images=images, source=self.name, origin=origin)

    def close(self) -> None:
        """Close the file handle that random access keeps open (reopened on the next access)."""
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
        self._handle = None

    def __del__(self):
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = state["_handle_pid"] = None
        return state


def _count_rows(path: Path) -> int:
    count = 0
    with path.open("rb") as handle:
        for line in handle:
            count += bool(line.strip())
    return count
