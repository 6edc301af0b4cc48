"""torch Datasets over sources: map-style (random access by index) and streaming (iterable, sharded per worker).

Both decode images inside DataLoader workers and never raise on a bad row: they count it in `skips` (a Tally that
adds up across workers) and return None (map-style) or move on (streaming). `VisionChatCollator` drops the Nones.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from vlmgraft.data.images import ImageSkipped
from vlmgraft.data.mixture import stream_plan
from vlmgraft.data.sample import Sample
from vlmgraft.data.source import RowRejected, Source
from vlmgraft.data.tally import Tally


def decode_or_count(source: Source, index: int, raw, skips: Tally) -> Sample | None:
    """One row → Sample, or None after counting why not."""
    try:
        return source.to_sample(index, raw)
    except ImageSkipped as err:
        skips.add(f"image {err.reason}", f"{err.where}" + (f" ({err.detail})" if err.detail else ""))
    except RowRejected as err:
        skips.add("row rejected", f"{err.origin}: {err.message}")
    except Exception as err:  # a row no reader foresaw must still not end the run: count it with its origin
        skips.add(f"row failed: {type(err).__name__}", f"{source.origin(index)}: {err}")
    skips.flush()
    return None


class SampleDataset(torch.utils.data.Dataset):
    """Map-style: item i is row `index[i] = (source, row)`; returns a Sample or None (skipped and counted)."""

    def __init__(self, sources: list[Source], index: np.ndarray, skips: Tally | None = None):
        self.sources = sources
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
        self.skips = skips if skips is not None else Tally("skips")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample | None:
        source_id, row = (int(v) for v in self.index[i])
        source = self.sources[source_id]
        try:
            raw = source.raw(row)
        except RowRejected as err:
            self.skips.add("row rejected", f"{err.origin}: {err.message}")
            self.skips.flush()
            return None
        return decode_or_count(source, row, raw, self.skips)

    def source_counts(self) -> dict[str, int]:
        """Rows per source name in this dataset (repeats counted)."""
        counts = Counter(self.sources[s].name for s in self.index[:, 0].tolist())
        return dict(counts)


class ListDataset(torch.utils.data.Dataset):
    """Already decoded Samples (small sets: evaluation splits, tests)."""

    def __init__(self, samples: list[Sample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def source_counts(self) -> dict[str, int]:
        return dict(Counter(s.source for s in self.samples))


class StreamingSampleDataset(torch.utils.data.IterableDataset):
    """Iterable over a weighted mixture without holding it in memory.

    Rows are dealt to (rank, worker) shards by each source (parquet row groups, jsonl lines), mixed with
    probability proportional to what each source has left this epoch, and shuffled through a bounded buffer.
    `exclude` holds (source, row) pairs kept for evaluation. Call `set_epoch(e)` for a new order each epoch.
    """

    def __init__(self, sources: list[Source], weights: list[float], seed: int = 0, skips: Tally | None = None,
                 shuffle_buffer: int = 256, exclude: set[tuple[int, int]] | None = None, rank: int = 0,
                 world_size: int = 1):
        self.sources, self.weights, self.seed = sources, list(weights), seed
        self.skips = skips if skips is not None else Tally("skips")
        self.shuffle_buffer, self.exclude = shuffle_buffer, exclude or set()
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:  # expected rows per epoch over all shards; lets trainers plan their schedules
        total = sum(round(w * len(s)) for s, w in zip(self.sources, self.weights, strict=True))
        return int(max(0, total - len(self.exclude)))

    def _shard(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _rows(self, source_id: int, shard: int, num_shards: int, rng: random.Random) -> Iterator[tuple[int, object]]:
        passes, fraction = stream_plan(self.weights[source_id])
        source = self.sources[source_id]
        for full in range(passes + (fraction > 0)):
            keep = 1.0 if full < passes else fraction
            for index, raw in source.iter_raw(shard, num_shards):
                if (source_id, index) in self.exclude or (keep < 1.0 and rng.random() >= keep):
                    continue
                yield index, raw

    def iter_raw(self, shard: int, num_shards: int, seed: int) -> Iterator[tuple[int, int, object]]:
        """(source, row, raw) for one shard, mixed and buffer-shuffled; no image decoded yet."""
        rng = random.Random(seed)
        streams = {s: self._rows(s, shard, num_shards, rng) for s in range(len(self.sources))}
        left = {s: max(1.0, self.weights[s] * len(self.sources[s]) / num_shards) for s in streams}
        buffer: list = []
        while streams:
            ids = list(streams)
            chosen = rng.choices(ids, weights=[left[s] for s in ids])[0]
            item = next(streams[chosen], None)
            if item is None:
                del streams[chosen]
                continue
            left[chosen] = max(1e-3, left[chosen] - 1)
            buffer.append((chosen, *item))
            if len(buffer) >= max(1, self.shuffle_buffer):
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[Sample]:
        shard, num_shards = self._shard()
        seed = hash((self.seed, self.epoch, shard)) & 0xFFFFFFFF
        for source_id, index, raw in self.iter_raw(shard, num_shards, seed):
            sample = decode_or_count(self.sources[source_id], index, raw, self.skips)
            if sample is not None:
                yield sample
