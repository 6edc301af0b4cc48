"""Counters of data events (skipped images, rejected rows, overflow decisions) that add up across DataLoader workers.

A `Tally` is a read-only mapping `reason -> count` that also keeps the first few examples of each reason (file and
row, image path), so a run can end with "3 images skipped: truncated (train.jsonl:17 img/3.jpg), ...".

Why not a plain Counter: DataLoader workers are separate processes, so counts made inside them never reach the
trainer's copy. Each process writes its own counts to a small JSON shard in a folder made by the owning process; the
owner reads its own counts plus every shard. That works the same with fork, spawn and forkserver start methods and with
persistent or per-epoch workers, costs one tiny file write per `flush()`, and needs no server process.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path


def _remove_if_owner(folder: str, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


class Tally(Mapping):
    """`reason -> count` (merged over every process that used this tally) plus a few examples per reason."""

    def __init__(self, name: str = "events", max_examples: int = 5):
        self.name = name
        self.max_examples = max_examples
        self._owner = os.getpid()
        self._folder = tempfile.mkdtemp(prefix=f"vlmgraft-{name}-")
        weakref.finalize(self, _remove_if_owner, self._folder, self._owner)
        self._reset_local()

    def _reset_local(self) -> None:
        self._pid = os.getpid()
        self._shard = f"{self._pid}-{uuid.uuid4().hex[:8]}.json"  # unique even when a later worker reuses the pid
        self._counts: Counter = Counter()
        self._examples: dict[str, list[str]] = {}
        self._dirty = False

    def __getstate__(self) -> dict:
        return {"name": self.name, "max_examples": self.max_examples, "_owner": self._owner, "_folder": self._folder}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_local()

    # -- writing ---------------------------------------------------------------------------------------------------
    def add(self, reason: str, example: str | None = None, n: int = 1) -> None:
        if os.getpid() != self._pid:  # a forked worker starts with the parent's numbers: count only its own
            self._reset_local()
        self._counts[reason] += n
        if example is not None:
            kept = self._examples.setdefault(reason, [])
            if len(kept) < self.max_examples:
                kept.append(example)
        self._dirty = True

    def flush(self) -> None:
        """Publish this worker's counts to the owner (a no-op in the owning process or when nothing changed)."""
        if not self._dirty or os.getpid() == self._owner or not os.path.isdir(self._folder):
            return
        shard = Path(self._folder) / self._shard
        tmp = shard.with_suffix(".tmp")
        tmp.write_text(json.dumps({"counts": self._counts, "examples": self._examples}, ensure_ascii=False))
        os.replace(tmp, shard)
        self._dirty = False

    # -- reading ---------------------------------------------------------------------------------------------------
    def _merged(self) -> tuple[Counter, dict[str, list[str]]]:
        if os.getpid() != self._pid:
            self._reset_local()
        counts, examples = Counter(self._counts), {k: list(v) for k, v in self._examples.items()}
        if os.getpid() == self._owner and os.path.isdir(self._folder):
            for shard in sorted(Path(self._folder).glob("*.json")):
                try:
                    data = json.loads(shard.read_text())
                except (OSError, ValueError):
                    continue  # a shard being replaced right now; the next read sees it
                counts.update(data["counts"])
                for reason, found in data["examples"].items():
                    kept = examples.setdefault(reason, [])
                    kept.extend(found[: max(0, self.max_examples - len(kept))])
        return counts, examples

    def __getitem__(self, reason: str) -> int:
        return self._merged()[0].get(reason, 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self._merged()[0])

    def __len__(self) -> int:
        return len(self._merged()[0])

    def counts(self) -> dict[str, int]:
        return dict(self._merged()[0])

    def examples(self, reason: str) -> list[str]:
        return self._merged()[1].get(reason, [])

    def total(self, prefix: str = "") -> int:
        return sum(v for k, v in self._merged()[0].items() if k.startswith(prefix))

    def report(self, prefix: str = "") -> str:
        """One line per reason: `  reason: count  (example, example, ...)`, largest first; empty string if none."""
        counts, examples = self._merged()
        lines = []
        for reason, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if not reason.startswith(prefix):
                continue
            shown = examples.get(reason, [])
            lines.append(f"  {reason}: {count}" + (f"  (e.g. {'; '.join(shown)})" if shown else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Tally({self.name!r}, {self.counts()})"
