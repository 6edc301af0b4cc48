"""Evaluation report files: results.json (one key per task), results.md (a table), predictions.jsonl and PNG plots.

Plots use matplotlib's object API (`Figure` + Agg canvas), which never touches pyplot's global backend, so they work
on headless machines and inside other programs' processes.
"""

from __future__ import annotations

import json
from pathlib import Path

HEADLINE = {
    "vqa": ("accuracy",),
    "grounding": ("precision", "recall", "f1", "mean_iou_of_matches", "unparseable_rate"),
    "caption": ("bleu", "chrf"),
    "parity": ("identical_answers", "changed_share", "max_abs_logit_diff"),
    "ablation": ("accuracy_real", "accuracy_noise", "gap", "answers_changed"),
}
# Lists kept out of results.json: per-sample records go to predictions.jsonl, raw IoUs only feed the histogram.
BULKY = ("records", "best_ious")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(results: dict, title: str = "") -> str:
    lines = [f"# {title}" if title else "# Evaluation", "", "| task | n | metric | value |", "|---|---|---|---|"]
    for task, scores in results.items():
        if "skipped" in scores:
            lines.append(f"| {task} | 0 | skipped | {scores['skipped']} |")
            continue
        for metric in HEADLINE.get(task, ()):
            lines.append(f"| {task} | {scores.get('n', scores.get('images', ''))} | {metric} | "
                         f"{_fmt(scores.get(metric))} |")
    by_source = results.get("vqa", {}).get("by_source") or {}
    if len(by_source) > 1:
        lines += ["", "## VQA accuracy by source", "", "| source | accuracy |", "|---|---|"]
        lines += [f"| {name} | {_fmt(acc)} |" for name, acc in by_source.items()]
    return "\n".join(lines) + "\n"


def _bar_plot(path: Path, title: str, values: dict[str, float]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.1 * len(values) + 1.5), 3.2))
    ax = fig.subplots()
    bars = ax.bar(list(values), list(values.values()), color="#4c72b0")
    ax.bar_label(bars, fmt="%.3g")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _histogram(path: Path, values: list[float], threshold: float) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.hist(values, bins=20, range=(0, 1), color="#55a868")
    ax.axvline(threshold, color="black", linestyle="--", label=f"IoU {threshold}")
    ax.set_xlabel("best IoU per reference box (same label)")
    ax.set_ylabel("reference boxes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_plots(results: dict, out: Path) -> list[Path]:
    written = []
    for task, scores in results.items():
        values = {m: scores[m] for m in HEADLINE.get(task, ()) if isinstance(scores.get(m), (int, float))}
        if task == "vqa" and len(scores.get("by_source") or {}) > 1:
            values.update({f"vqa:{k}": v for k, v in scores["by_source"].items()})
        if values and "skipped" not in scores:
            _bar_plot(out / f"{task}.png", task, values)
            written.append(out / f"{task}.png")
    grounding = results.get("grounding", {})
    if grounding.get("best_ious"):
        _histogram(out / "grounding_iou_hist.png", grounding["best_ious"], grounding["iou_threshold"])
        written.append(out / "grounding_iou_hist.png")
    return written


def write_report(results: dict, out: Path, title: str = "") -> dict:
    """Write every report file; returns results.json's content (scores without the bulky per-sample lists)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w") as f:
        for task, scores in results.items():
            for record in scores.get("records", []):
                f.write(json.dumps({"task": task, **record}, ensure_ascii=False) + "\n")
    write_plots(results, out)
    slim = {task: {k: v for k, v in scores.items() if k not in BULKY} for task, scores in results.items()}
    (out / "results.json").write_text(json.dumps(slim, indent=2, ensure_ascii=False))
    (out / "results.md").write_text(markdown_table(slim, title))
    return slim
