"""`vlmgraft data inspect`: what a SPEC holds, how long its samples are in tokens, what the loss sees, what is broken.

Every section is a function returning text, so tests read the same report a user sees.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from vlmgraft.data.dataset import decode_or_count
from vlmgraft.data.encode import IGNORE, Encoded
from vlmgraft.data.mixture import epoch_index
from vlmgraft.data.render import flatten_text
from vlmgraft.data.sample import Sample
from vlmgraft.data.spec import open_mixture
from vlmgraft.data.tally import Tally

DIM, BOLD, RESET = "\x1b[2m", "\x1b[1;32m", "\x1b[0m"


@dataclass
class Inspection:
    sources: list
    weights: list[float]
    samples: list[Sample]
    skips: Tally
    encoded: list[Encoded | None] = field(default_factory=list)
    collator_stats: Tally | None = None


def inspect_spec(spec, *, limit: int = 1000, seed: int = 0, collator=None) -> Inspection:
    """Index the SPEC, decode up to `limit` samples in mixture order, and encode them when a collator is given."""
    skips = Tally("skips", max_examples=1 << 30)  # the report lists every problem, not a sample of them
    sources, weights = open_mixture(spec, seed=seed, skips=skips)
    index = epoch_index([len(s) for s in sources], weights, seed=seed)
    samples = []
    for source_id, row in index[:limit].tolist():
        sample = decode_or_count(sources[source_id], row, sources[source_id].raw(row), skips)
        if sample is not None:
            samples.append(sample)
    result = Inspection(sources, weights, samples, skips)
    if collator is not None:
        result.encoded = [collator.encode(s) for s in samples]
        result.collator_stats = collator.stats
    return result


def sources_table(result: Inspection) -> str:
    decoded = Counter(s.source for s in result.samples)
    lines = ["sources:"]
    for source, weight in zip(result.sources, result.weights, strict=True):
        lines.append(f"  {source.name:<24} {source.format:<9} rows {len(source):>8}  weight {weight:g}  "
                     f"decoded {decoded.get(source.name, 0):>6}  rejected while indexing {len(source.problems)}"
                     f"  ({source.path})")
    return "\n".join(lines)


def _histogram(values: list[int], title: str, bins: int = 8, width: int = 40) -> str:
    if not values:
        return f"{title}: none"
    array = np.asarray(values)
    edges = np.unique(np.linspace(array.min(), array.max() + 1, bins + 1).astype(int))
    counts, _ = np.histogram(array, bins=edges)
    peak = max(counts.max(), 1)
    lines = [f"{title}: mean {array.mean():.0f}, min {array.min()}, max {array.max()}"]
    for lo, hi, count in zip(edges[:-1], edges[1:], counts, strict=True):
        lines.append(f"  {lo:>6}–{hi - 1:<6} {'█' * int(round(width * count / peak)):<{width}} {count}")
    return "\n".join(lines)


def token_report(result: Inspection, image_token_id: int) -> str:
    encoded = [e for e in result.encoded if e is not None]
    image = [int((e.input_ids == image_token_id).sum()) for e in encoded]
    text = [len(e) - i for e, i in zip(encoded, image, strict=True)]
    parts = [_histogram([i + t for i, t in zip(image, text, strict=True)], "tokens per sample (all)"),
             _histogram(image, "image tokens per sample"), _histogram(text, "text tokens per sample")]
    if result.collator_stats is not None:
        events = result.collator_stats.report("overflow") or "  none"
        rejected = result.collator_stats.report("sample rejected")
        parts.append("over max_length:\n" + events + (f"\n{rejected}" if rejected else ""))
    return "\n\n".join(parts)


def render_example(encoded: Encoded, tokenizer, image_token_id: int, color: bool) -> str:
    """The sample's tokens as text: loss tokens bold (or inside ⟦ ⟧), others dim; image-token runs compressed."""
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
    kinds = ["image" if t == image_token_id else "trained" if lab != IGNORE else "plain"
             for t, lab in zip(ids, labels, strict=True)]
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):  # decode whole runs, so multi-byte characters are not split
        if end == len(ids) or kinds[end] != kinds[start]:
            run = ids[start:end]
            text = f"{image_token}×{len(run)}" if kinds[start] == "image" else tokenizer.decode(run)
            pieces.append((text, kinds[start] == "trained"))
            start = end
    if color:
        return "".join(f"{BOLD if trained else DIM}{text}{RESET}" for text, trained in pieces)
    return "".join(f"⟦{text}⟧" if trained else text for text, trained in pieces)


def plain_example(sample: Sample) -> str:
    lines = []
    for message in sample.messages:
        content = message["content"]
        shown = "".join("<image>" if p.get("type") == "image" else p.get("text", "") for p in content) \
            if isinstance(content, list) else flatten_text(content)
        lines.append(f"  {message['role']}: {shown}")
    return "\n".join(lines)


def problems_report(result: Inspection) -> str:
    counts = result.skips.counts()
    if not counts:
        return "problems: none"
    lines = [f"problems: {sum(counts.values())}"]
    for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason} ({count}):")
        lines += [f"    {example}" for example in result.skips.examples(reason)]
    return "\n".join(lines)
