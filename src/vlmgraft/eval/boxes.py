"""Grounding metrics: greedy one-to-one box matching per label at an IoU threshold; precision, recall, F1, mean IoU.

Matching per image and label: all (prediction, reference) pairs of the same normalised label sorted by IoU, highest
first; a pair is a match when both boxes are still free and IoU ≥ threshold. Counts are summed over images
(micro-averaged). An answer with no box list at all (`parse_boxes` → None) is "unparseable": counted on its own and
scored as predicting nothing, so its references count as misses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmgraft.grounding import Box, iou


def _label(box: Box) -> str:
    return box.label.strip().lower()


@dataclass
class BoxMatch:
    true_positives: int = 0
    predictions: int = 0
    references: int = 0
    matched_ious: list[float] = field(default_factory=list)
    best_ious: list[float] = field(default_factory=list)  # per reference: best IoU with a same-label prediction


def match_boxes(predicted: list[Box], reference: list[Box], threshold: float = 0.5) -> BoxMatch:
    result = BoxMatch(predictions=len(predicted), references=len(reference))
    pairs = sorted(((iou(p, r), i, j) for i, p in enumerate(predicted) for j, r in enumerate(reference)
                    if _label(p) == _label(r)), reverse=True)
    used_pred: set[int] = set()
    used_ref: set[int] = set()
    for value, i, j in pairs:
        if value < threshold:
            break
        if i in used_pred or j in used_ref:
            continue
        used_pred.add(i)
        used_ref.add(j)
        result.matched_ious.append(value)
    result.true_positives = len(result.matched_ious)
    result.best_ious = [max((v for v, _, jj in pairs if jj == j), default=0.0) for j in range(len(reference))]
    return result


def grounding_scores(predictions: list[list[Box] | None], references: list[list[Box]],
                     threshold: float = 0.5) -> dict:
    """Aggregate scores over images; `predictions[i]` is None for an unparseable answer."""
    total = BoxMatch()
    unparseable = 0
    for predicted, reference in zip(predictions, references, strict=True):
        if predicted is None:
            unparseable += 1
            predicted = []
        one = match_boxes(predicted, reference, threshold)
        total.true_positives += one.true_positives
        total.predictions += one.predictions
        total.references += one.references
        total.matched_ious += one.matched_ious
        total.best_ious += one.best_ious
    precision = total.true_positives / total.predictions if total.predictions else 0.0
    recall = total.true_positives / total.references if total.references else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "images": len(references), "iou_threshold": threshold, "precision": precision, "recall": recall, "f1": f1,
        "mean_iou_of_matches": sum(total.matched_ious) / len(total.matched_ious) if total.matched_ious else 0.0,
        "true_positives": total.true_positives, "predicted_boxes": total.predictions,
        "reference_boxes": total.references, "unparseable": unparseable,
        "unparseable_rate": unparseable / len(references) if references else 0.0,
        "best_ious": total.best_ious,
    }
