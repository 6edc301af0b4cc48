"""The grounding answer format, shared by data (writing targets), `detect` and evaluation (parsing answers).

An answer is `<box>[{"label": "狗", "box": [x1, y1, x2, y2]}, ...]</box>` with integer coordinates 0–1000 relative to
the image's width and height; an empty list means "none present". Parsing is tolerant: a truncated or slightly
malformed answer still yields every box object that is complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

OPEN, CLOSE = "<box>", "</box>"
SCALE = 1000
_OBJECT = re.compile(r"\{[^{}]*\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        return (self.x1 * width / SCALE, self.y1 * height / SCALE, self.x2 * width / SCALE, self.y2 * height / SCALE)


def to_relative(box_xyxy: tuple[float, float, float, float], width: int, height: int) -> list[int]:
    """Pixel box → integer 0–1000 coordinates, clamped to the image."""
    x1, y1, x2, y2 = box_xyxy
    rel = [x1 / width, y1 / height, x2 / width, y2 / height]
    return [min(SCALE, max(0, round(v * SCALE))) for v in rel]


def format_boxes(boxes: list[dict]) -> str:
    """`[{"label": ..., "box": [x1, y1, x2, y2]}]` (0–1000 ints) → the answer string."""
    items = [{"label": b["label"], "box": [int(v) for v in b["box"]]} for b in boxes]
    return OPEN + json.dumps(items, ensure_ascii=False) + CLOSE


def parse_boxes(text: str) -> list[Box] | None:
    """Every complete box in an answer; None when the answer holds no box list at all (unparseable)."""
    start = text.find(OPEN)
    body = text[start + len(OPEN):] if start >= 0 else text
    end = body.find(CLOSE)
    body = body[:end] if end >= 0 else body
    if start < 0 and "[" not in body:
        return None
    try:
        parsed = json.loads(body)
        objects = parsed if isinstance(parsed, list) else None
    except json.JSONDecodeError:
        objects = None
    if objects is None:  # truncated or malformed: salvage each complete {...}
        objects = []
        for chunk in _OBJECT.findall(body):
            try:
                objects.append(json.loads(chunk))
            except json.JSONDecodeError:
                label = re.search(r'"label"\s*:\s*"([^"]*)"', chunk)
                numbers = _NUMBER.findall(chunk[chunk.find("box"):]) if "box" in chunk else []
                if label and len(numbers) >= 4:
                    objects.append({"label": label.group(1), "box": [float(n) for n in numbers[:4]]})
        if not objects and start < 0:
            return None
    boxes = []
    for obj in objects:
        if not isinstance(obj, dict):
            continue
        coords = obj.get("box") or obj.get("bbox")
        if not isinstance(coords, (list, tuple)) or len(coords) != 4:
            continue
        try:
            x1, y1, x2, y2 = (min(SCALE, max(0.0, float(v))) for v in coords)
        except (TypeError, ValueError):
            continue
        boxes.append(Box(str(obj.get("label", "")), min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    iy = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = ix * iy
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0
