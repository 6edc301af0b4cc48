"""Data SPECs: what `train`, `eval` and `data inspect` accept, and the two ways to load one.

A SPEC is
- a path whose format is detected: `.jsonl` by its keys (`messages` → messages, `query`/`response` → swift), a
  `.json` with `images` + `annotations` → coco, a parquet file, a folder of parquet files or a `datasets` folder →
  cauldron; a hub id (`owner/name`) → cauldron through `datasets.load_dataset` (online only);
- `FORMAT:PATH` to force the format (cauldron, swift, messages, coco);
- a YAML file describing a weighted mixture:

      sources:
        - path: data/the_cauldron        # any SPEC string
          subsets: [ai2d, chartqa]       # reader options (see OPTIONS) go beside path
          weight: 0.5                    # rows per epoch = round(weight × rows)
        - {path: "coco:data/instances.json", images_dir: data/train2017, lang: zh, weight: 2}

`load_samples` decodes a small set into a list (evaluation); `build_dataset` gives torch datasets for training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from vlmgraft.data.images import DEFAULT_POLICY, ImagePolicy
from vlmgraft.data.sample import Sample
from vlmgraft.data.source import Source
from vlmgraft.data.tally import Tally
from vlmgraft.errors import VlmgraftError

FORMATS = ("cauldron", "swift", "messages", "coco")
OPTIONS = {
    "cauldron": {"subsets", "images", "split"},
    "swift": set(),
    "messages": set(),
    "coco": {"images_dir", "lang", "turns", "max_boxes", "negative_rate", "task_weights", "prompts", "captions"},
}
ENTRY_KEYS = {"path", "format", "weight", "name"}
log = logging.getLogger(__name__)


@dataclass
class SourceSpec:
    """One entry of a mixture: where, which format (None: detect), its weight and reader options."""

    path: str
    format: str | None = None
    weight: float = 1.0
    name: str | None = None
    options: dict = field(default_factory=dict)


def parse_spec(spec) -> list[SourceSpec]:
    """A SPEC string/path, a YAML mixture file, or already-built SourceSpec(s) → list of SourceSpec."""
    if isinstance(spec, SourceSpec):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [entry for item in spec for entry in parse_spec(item)]
    if isinstance(spec, dict):
        return [_entry(spec, "<dict>", 0)]
    text = str(spec)
    fmt, path = _split_format(text)
    if fmt is None and Path(path).suffix in (".yaml", ".yml"):
        return _read_mixture(Path(path))
    return [SourceSpec(path=path, format=fmt)]


def _split_format(text: str) -> tuple[str | None, str]:
    head, sep, rest = text.partition(":")
    if sep and head in FORMATS:
        return head, rest
    if sep and head.isalpha() and len(head) > 1 and not Path(text).exists() and "/" not in head:
        raise VlmgraftError(f"unknown data format {head!r} in {text!r}; expected one of {list(FORMATS)}")
    return None, text


def _read_mixture(path: Path) -> list[SourceSpec]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise VlmgraftError(f"cannot read data spec {path}: {err}") from err
    except yaml.YAMLError as err:
        raise VlmgraftError(f"data spec {path} is not valid YAML: {err}") from err
    entries = data.get("sources") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise VlmgraftError(f"data spec {path} needs a non-empty 'sources:' list")
    specs = []
    for n, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise VlmgraftError(f"{path}: sources[{n}] must be a SPEC string or a mapping with 'path'")
        spec = _entry(entry, str(path), n)
        if not Path(spec.path).is_absolute() and (path.parent / spec.path).exists():
            spec.path = str(path.parent / spec.path)  # paths in the YAML are relative to the YAML file
        for key in ("images_dir", "prompts", "captions"):  # file options are relative to the YAML file too
            value = spec.options.get(key)
            if isinstance(value, str) and not Path(value).is_absolute() and (path.parent / value).exists():
                spec.options[key] = str(path.parent / value)
        specs.append(spec)
    return specs


def _entry(entry: dict, where: str, n: int) -> SourceSpec:
    if "path" not in entry:
        raise VlmgraftError(f"{where}: sources[{n}] has no 'path'")
    fmt, path = _split_format(str(entry["path"]))
    fmt = entry.get("format", fmt)
    if fmt is not None and fmt not in FORMATS:
        raise VlmgraftError(f"{where}: sources[{n}] format {fmt!r} is not one of {list(FORMATS)}")
    try:
        weight = float(entry.get("weight", 1.0))
    except (TypeError, ValueError) as err:
        raise VlmgraftError(f"{where}: sources[{n}] weight {entry.get('weight')!r} is not a number") from err
    if weight < 0:
        raise VlmgraftError(f"{where}: sources[{n}] weight must be >= 0")
    options = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    return SourceSpec(path=path, format=fmt, weight=weight, name=entry.get("name"), options=options)


def detect_format(path: str) -> str:
    """The format of a path from its type and contents (see the module docstring)."""
    local = Path(path).expanduser()
    if local.is_dir() or local.suffix == ".parquet":
        return "cauldron"
    if local.suffix == ".jsonl":
        return _jsonl_format(local)
    if local.suffix == ".json":
        if not local.is_file():
            raise VlmgraftError(f"data file {str(local)!r} does not exist")
        with local.open(encoding="utf-8") as handle:
            head = handle.read(1 << 20)
        if '"annotations"' in head or '"images"' in head:
            return "coco"
        raise VlmgraftError(f"{local}: a .json SPEC must be COCO (with 'images' and 'annotations'); chat rows belong "
                            f"in .jsonl files")
    if not local.exists():
        if str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
            return "cauldron"  # a hub id
        raise VlmgraftError(f"data path {str(path)!r} does not exist")
    raise VlmgraftError(f"cannot tell the format of {str(path)!r} from its type; prefix it with one of "
                        f"{[f + ':' for f in FORMATS]}")


def _jsonl_format(path: Path) -> str:
    if not path.is_file():
        raise VlmgraftError(f"data file {str(path)!r} does not exist")
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a bad first line is reported by the reader; look at the next one
            if isinstance(row, dict) and "messages" in row:
                return "messages"
            if isinstance(row, dict) and ("query" in row or "response" in row):
                return "swift"
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise VlmgraftError(f"{path}:{number}: cannot tell the jsonl format from keys {keys}; expected "
                                f"'messages' (messages format) or 'query'/'response' (swift format)")
    raise VlmgraftError(f"{path} holds no JSON rows")


def open_sources(spec: SourceSpec, *, policy: ImagePolicy = DEFAULT_POLICY, streaming: bool = False,
                 seed: int = 0) -> list[Source]:
    """The Source(s) one entry names (a Cauldron folder gives one per subset)."""
    fmt = spec.format or detect_format(spec.path)
    unknown = set(spec.options) - OPTIONS[fmt]
    if unknown:
        raise VlmgraftError(f"{spec.path}: option(s) {sorted(unknown)} do not apply to the {fmt} format "
                            f"(it takes {sorted(OPTIONS[fmt]) or 'none'})")
    if fmt == "cauldron":
        from vlmgraft.data.cauldron import cauldron_sources

        subsets = spec.options.get("subsets")
        subsets = [subsets] if isinstance(subsets, str) else subsets
        return cauldron_sources(spec.path, subsets=subsets, image_mode=spec.options.get("images", "all"),
                                policy=policy, streaming=streaming, split=spec.options.get("split", "train"),
                                name=spec.name)
    if fmt == "swift":
        from vlmgraft.data.swift import SwiftSource

        return [SwiftSource(spec.path, spec.name, policy, streaming)]
    if fmt == "messages":
        from vlmgraft.data.messages import MessagesSource

        return [MessagesSource(spec.path, spec.name, policy, streaming)]
    from vlmgraft.data.coco import CocoSource

    return [CocoSource(spec.path, spec.name, policy, seed=seed, **spec.options)]


def open_mixture(spec, *, policy: ImagePolicy = DEFAULT_POLICY, streaming: bool = False, seed: int = 0,
                 skips: Tally | None = None) -> tuple[list[Source], list[float]]:
    """Every Source of a SPEC with its weight; rows rejected while indexing are counted in `skips`."""
    sources, weights = [], []
    for entry in parse_spec(spec):
        for source in open_sources(entry, policy=policy, streaming=streaming, seed=seed):
            sources.append(source)
            weights.append(entry.weight)
            if skips is not None:
                for problem in source.problems:
                    skips.add("row rejected", f"{problem.origin}: {problem.message}")
    if not sources:
        raise VlmgraftError(f"data spec {spec!r} names no data")
    return sources, weights


def load_samples(spec, *, limit: int | None = None, seed: int = 0, shuffle: bool = True,
                 policy: ImagePolicy = DEFAULT_POLICY, skips: Tally | None = None) -> list[Sample]:
    """Decode up to `limit` samples of a SPEC in this process (seeded mixture order; bad rows skipped and counted)."""
    from vlmgraft.data.dataset import decode_or_count
    from vlmgraft.data.mixture import epoch_index

    skips = skips if skips is not None else Tally("skips")
    sources, weights = open_mixture(spec, policy=policy, seed=seed, skips=skips)
    index = epoch_index([len(s) for s in sources], weights, seed=seed, shuffle=shuffle)
    samples = []
    for source_id, row in index.tolist():
        if limit is not None and len(samples) >= limit:
            break
        sample = decode_or_count(sources[source_id], row, sources[source_id].raw(row), skips)
        if sample is not None:
            samples.append(sample)
    if skips.total():
        log.warning("skipped while loading %s:\n%s", spec, skips.report())
    return samples


def build_dataset(spec, *, seed: int = 0, eval_size: int = 0, streaming: bool = False,
                  policy: ImagePolicy = DEFAULT_POLICY, shuffle_buffer: int = 256, rank: int = 0,
                  world_size: int = 1):
    """(train, eval) torch datasets of a SPEC; eval is None when `eval_size` is 0.

    Map-style (default): `SampleDataset` over the seeded epoch index, eval = its first `eval_size` distinct rows.
    `streaming=True`: `StreamingSampleDataset` (iterable, sharded by rank and worker); eval = a `ListDataset` of the
    first `eval_size` rows of the stream, which training then never yields. Both share one `skips` Tally.
    """
    from vlmgraft.data.dataset import ListDataset, SampleDataset, StreamingSampleDataset, decode_or_count
    from vlmgraft.data.mixture import epoch_index, split_off

    skips = Tally("skips")
    sources, weights = open_mixture(spec, policy=policy, streaming=streaming, seed=seed, skips=skips)
    if not streaming:
        index = epoch_index([len(s) for s in sources], weights, seed=seed)
        train_index, eval_index = split_off(index, eval_size)
        train = SampleDataset(sources, train_index, skips)
        return train, (SampleDataset(sources, eval_index, skips) if eval_size else None)
    stream = StreamingSampleDataset(sources, weights, seed, skips, shuffle_buffer, rank=rank, world_size=world_size)
    if not eval_size:
        return stream, None
    held, samples = set(), []
    for source_id, row, raw in stream.iter_raw(0, 1, seed=seed - 1):
        if len(samples) >= eval_size:
            break
        held.add((source_id, row))
        sample = decode_or_count(sources[source_id], row, raw, skips)
        if sample is not None:
            samples.append(sample)
    stream.exclude = held
    return stream, ListDataset(samples)
