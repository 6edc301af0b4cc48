"""The end-of-run data report: rows per source, everything skipped (with examples) and the collator's decisions."""

from __future__ import annotations


def data_report(dataset=None, collator=None) -> str:
    """Text for a log or the console; pass the training dataset and/or the collator used with it."""
    lines = []
    counts = dataset.source_counts() if dataset is not None and hasattr(dataset, "source_counts") else {}
    if counts:
        lines.append("rows per source: " + ", ".join(f"{name} {n}" for name, n in sorted(counts.items())))
    skips = getattr(dataset, "skips", None)
    if skips is not None:
        lines.append(f"skipped rows: {skips.total()}" + (f"\n{skips.report()}" if skips.total() else ""))
    if collator is not None:
        stats = collator.stats.counts()
        done = ", ".join(f"{key} {stats[key]}" for key in ("samples", "batches", "rows", "tokens", "loss tokens",
                                                           "padding tokens") if key in stats)
        lines.append(f"collator: {done or 'nothing collated'}")
        parts = (collator.stats.report(prefix) for prefix in ("overflow", "sample rejected", "empty"))
        events = "\n".join(part for part in parts if part)
        lines.append("over max_length / rejected:\n" + events if events else "over max_length / rejected: none")
    return "\n".join(lines)
