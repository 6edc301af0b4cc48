"""Detection data (COCO json; Objects365 uses the same layout) turned into grounding conversations.

Each image becomes one sample of `turns` question/answer pairs, each task drawn at random (seeded by image id) from:
- `caption`: when the json holds captions (COCO captions `annotations` with a `caption`, or a top-level `captions`
  list of `{image_id, caption, lang?}`);
- `qa`: when the json holds a top-level `qa` list of `{image_id, question, answer, lang?}` (a vlmgraft extension);
- `detect`: "find every {label}" for a class present at most `max_boxes` times (crowd boxes excluded), answered
  `<box>[{"label": ..., "box": [x1, y1, x2, y2]}]</box>` with 0–1000 integers; with probability `negative_rate`
  the class is one that is absent, answered `<box>[]</box>` alone.

Boxes are given in the frame the model sees: the image after its EXIF orientation is applied (see `_annotation_frame`).
Class names in zh prompts come from the built-in table (COCO's 80 classes) or a prompts file's `synonyms:`; a class
with neither keeps its own name, and the source logs once which classes had no Chinese name.

Annotations are held as numpy arrays sorted by image, with per-image offsets, not as Python objects: forked DataLoader
workers then share their pages instead of copying millions of reference-counted boxes. An annotation that cannot be
used (a null or malformed bbox, an unknown category or image) is skipped and counted in `problems`, naming its id.
"""

from __future__ import annotations

import json
import logging
import math
import random
from array import array
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlmgraft.data.images import DEFAULT_POLICY, ImagePolicy, skipping
from vlmgraft.data.prompts import LANGS, PromptBook
from vlmgraft.data.sample import Sample
from vlmgraft.data.source import RowRejected, Source
from vlmgraft.errors import VlmgraftError
from vlmgraft.grounding import format_boxes, to_relative
from vlmgraft.images import load_image_oriented

log = logging.getLogger(__name__)
TASK_WEIGHTS = {"caption": 1.0, "qa": 1.0, "detect": 2.0}
SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that turn a W×H image into H×W


def _turn_box(box: tuple[float, float, float, float], orientation: int) -> tuple[float, float, float, float]:
    """A box in the unit square of the stored pixels → the same box after the EXIF `orientation` is applied."""
    x1, y1, x2, y2 = box
    return {1: (x1, y1, x2, y2), 2: (1 - x2, y1, 1 - x1, y2), 3: (1 - x2, 1 - y2, 1 - x1, 1 - y1),
            4: (x1, 1 - y2, x2, 1 - y1), 5: (y1, x1, y2, x2), 6: (1 - y2, x1, 1 - y1, x2),
            7: (1 - y2, 1 - x2, 1 - y1, 1 - x1), 8: (y1, 1 - x2, y2, 1 - x1)}[orientation]


def _annotation_frame(json_size: tuple[int, int], shown: tuple[int, int], orientation: int) -> tuple[int, int, int]:
    """(width, height) the annotations are measured in, and the EXIF turn still to apply to them.

    COCO tools (pycocotools, torchvision) read the stored pixels without EXIF, so annotations are taken to be in the
    stored frame, scaled by the JSON's width/height when given (images may be stored resized), and turned as the
    image is. The one case the sizes disprove: an axis-swapping tag with a JSON size equal to the upright size and
    not the stored one means the annotator already saw the image upright, so its boxes need no turn.
    """
    stored = (shown[1], shown[0]) if orientation in SWAPS_AXES else shown
    if not all(json_size):
        return stored[0], stored[1], orientation
    if orientation in SWAPS_AXES and json_size == shown and shown != stored:
        return json_size[0], json_size[1], 1
    return json_size[0], json_size[1], orientation


def _bbox(value) -> tuple[float, float, float, float] | None:
    """A COCO `[x, y, width, height]` → x1, y1, x2, y2; None unless 4 finite numbers with positive size."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    x, y, w, h = (float(v) for v in value)
    return (x, y, x + w, y + h) if w > 0 and h > 0 else None


def _size(value) -> int:
    """A json width/height, or 0 (unknown: the decoded image's size is used) when it is not a usable number."""
    usable = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 2**31
    return int(value) if usable else 0


class CocoSource(Source):
    format = "coco"

    def __init__(self, path: str | Path, name: str | None = None, policy: ImagePolicy = DEFAULT_POLICY, *,
                 images_dir: str | Path | None = None, lang: str = "zh", turns: int = 1, max_boxes: int = 10,
                 negative_rate: float = 0.15, task_weights: dict | None = None, prompts: str | Path | None = None,
                 captions: str | Path | None = None, seed: int = 0, streaming: bool = False):
        path = Path(path)
        super().__init__(path, name or path.stem, policy)
        if lang not in (*LANGS, "both"):
            raise VlmgraftError(f"lang={lang!r} for {path}: expected one of {[*LANGS, 'both']}")
        self.lang, self.turns, self.max_boxes, self.seed = lang, turns, max_boxes, seed
        self.negative_rate = negative_rate
        self.task_weights = {**TASK_WEIGHTS, **(task_weights or {})}
        self.book = PromptBook(prompts)
        data = _read_json(path)
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise VlmgraftError(f"{path} is not COCO json: it needs an {key!r} list (keys found: {sorted(data)})")
        categories = {c["id"]: str(c["name"]) for c in data.get("categories") or []
                      if isinstance(c, dict) and "id" in c and isinstance(c.get("name"), str)}
        self.names = sorted(set(categories.values()))
        self._category = {cid: self.names.index(name) for cid, name in categories.items()}
        self._read_images(path, data["images"])
        self.captions: dict[int, list[tuple[str, str | None]]] = defaultdict(list)  # by image index
        self.qa: dict[int, list[tuple[str, str, str | None]]] = defaultdict(list)
        self._collect(path, data, captions)
        del data
        self.images_dir = self._find_images_dir(path, images_dir)
        self.untranslated = [n for n in self.names if not self.book.has_name(n, "zh")] if lang != "en" else []
        if self.untranslated:
            shown = ", ".join(self.untranslated[:20]) + (" ..." if len(self.untranslated) > 20 else "")
            log.warning("%s: %d class(es) have no Chinese name, so zh prompts use their own name: %s. Give names "
                        "under `synonyms:` in a prompts file (the `prompts` option).", path, len(self.untranslated),
                        shown)

    def _read_images(self, path: Path, images: list) -> None:
        ids, widths, heights, names = array("q"), array("i"), array("i"), []
        self._index: dict[int, int] = {}  # image id → index; only while reading the annotations
        for n, image in enumerate(images):
            if not isinstance(image, dict) or not isinstance(image.get("id"), int) \
                    or not isinstance(image.get("file_name"), str):
                self.problems.append(RowRejected(f"{path}[images][{n}]", "an image needs an integer 'id' and a "
                                                                         "'file_name'"))
                continue
            self._index[image["id"]] = len(ids)
            ids.append(image["id"])
            widths.append(_size(image.get("width")))
            heights.append(_size(image.get("height")))
            names.append(image["file_name"].encode("utf-8"))
        self.image_ids = np.frombuffer(ids, dtype=np.int64).copy()
        self.sizes = np.stack([np.frombuffer(widths, np.int32), np.frombuffer(heights, np.int32)], axis=1)
        self._names = np.frombuffer(b"".join(names), dtype=np.uint8).copy()
        self._name_ends = np.cumsum([len(n) for n in names], dtype=np.int64)

    def _file_name(self, index: int) -> str:
        start = int(self._name_ends[index - 1]) if index else 0
        return self._names[start:int(self._name_ends[index])].tobytes().decode("utf-8")

    def _collect(self, path: Path, data: dict, captions_file) -> None:
        owner, category, crowd, boxes = array("q"), array("i"), array("b"), array("f")
        for n, ann in enumerate(data["annotations"]):
            origin = f"{path}[annotations][{n}]"
            if not isinstance(ann, dict) or "image_id" not in ann:
                self.problems.append(RowRejected(origin, "an annotation needs 'image_id'"))
                continue
            index = self._index.get(ann["image_id"])
            if "caption" in ann and "bbox" not in ann:
                if index is not None:
                    self.captions[index].append((str(ann["caption"]).strip(), ann.get("lang")))
                continue
            box = _bbox(ann.get("bbox"))
            if box is None or ann.get("category_id") not in self._category or index is None:
                what = ("bbox " + json.dumps(ann.get("bbox")) + " is not [x, y, width, height] of 4 finite numbers "
                        "with positive size" if box is None else
                        f"category_id {ann.get('category_id')!r} is not in 'categories'"
                        if index is not None else f"image_id {ann['image_id']!r} is not in 'images'")
                self.problems.append(RowRejected(origin, f"annotation id={ann.get('id')!r}: {what}"))
                continue
            owner.append(index)
            category.append(self._category[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
            boxes.extend(box)
        order = np.argsort(np.frombuffer(owner, dtype=np.int64), kind="stable")
        self.box_category = np.frombuffer(category, dtype=np.int32)[order]
        self.box_crowd = np.frombuffer(crowd, dtype=np.int8)[order].astype(bool)
        self.boxes = np.frombuffer(boxes, dtype=np.float32).reshape(-1, 4)[order]  # x1, y1, x2, y2 in pixels
        counts = np.bincount(np.frombuffer(owner, dtype=np.int64), minlength=len(self.image_ids))
        self.box_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        extra = _read_json(Path(captions_file)).get("annotations", []) if captions_file else []
        for entry in [*(data.get("captions") or []), *extra]:
            if isinstance(entry, dict) and entry.get("image_id") in self._index and entry.get("caption"):
                self.captions[self._index[entry["image_id"]]].append((str(entry["caption"]).strip(),
                                                                      entry.get("lang")))
        for entry in data.get("qa") or []:
            if isinstance(entry, dict) and entry.get("image_id") in self._index and entry.get("question") \
                    and entry.get("answer"):
                self.qa[self._index[entry["image_id"]]].append((str(entry["question"]), str(entry["answer"]),
                                                                entry.get("lang")))
        del self._index

    def _find_images_dir(self, path: Path, images_dir) -> Path:
        if images_dir is not None:
            return Path(images_dir).expanduser()
        candidates = [path.parent, path.parent / "images", path.parent.parent / "images"]
        if len(self):
            first = self._file_name(0)
            for folder in candidates:
                if (folder / first).exists():
                    return folder
        return path.parent

    def __len__(self) -> int:
        return len(self.image_ids)

    def origin(self, index: int) -> str:
        return f"{self.path}[image_id={int(self.image_ids[index])}]"

    def raw(self, index: int) -> tuple:
        width, height = (int(v) for v in self.sizes[index])
        return int(self.image_ids[index]), self._file_name(index), width, height

    def iter_raw(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, tuple]]:
        for index in range(shard, len(self), num_shards):
            yield index, self.raw(index)

    def to_sample(self, index: int, raw: tuple) -> Sample:
        image_id, file_name, width, height = raw
        origin = f"{self.path}[image_id={image_id}]"
        with skipping(origin):
            image, orientation = load_image_oriented(self.images_dir / file_name, self.policy)
        frame = _annotation_frame((width, height), image.size, orientation)
        rng = random.Random(f"{self.seed}:{image_id}")
        messages = []
        for turn in range(self.turns):
            lang = rng.choice(LANGS) if self.lang == "both" else self.lang
            task = self._choose_task(index, lang, rng)
            if task is None:
                break
            question, answer = self._make_task(task, index, lang, frame, rng)
            parts = [{"type": "image"}] if turn == 0 else []
            messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
            messages.append({"role": "assistant", "content": answer})
        if not messages:
            raise RowRejected(origin, "no caption, QA or usable class to ask about")
        return Sample(messages=messages, images=[image], source=self.name, origin=origin)

    def _objects(self, index: int) -> slice:
        return slice(int(self.box_starts[index]), int(self.box_starts[index + 1]))

    def _eligible(self, index: int) -> list[str]:
        objects = self._objects(index)
        counts = np.bincount(self.box_category[objects], minlength=len(self.names))
        crowded = np.bincount(self.box_category[objects][self.box_crowd[objects]], minlength=len(self.names))
        return [self.names[c] for c in np.flatnonzero((counts > 0) & (counts <= self.max_boxes) & (crowded == 0))]

    def _absent(self, index: int) -> list[str]:
        present = set(self.box_category[self._objects(index)].tolist())
        return [name for c, name in enumerate(self.names) if c not in present]

    def _captions(self, index: int, lang) -> list[str]:
        return [text for text, cap_lang in self.captions.get(index, []) if cap_lang in (None, lang)]

    def _qa(self, index: int, lang) -> list[tuple[str, str]]:
        return [(q, a) for q, a, qa_lang in self.qa.get(index, []) if qa_lang in (None, lang)]

    def _choose_task(self, index: int, lang: str, rng: random.Random) -> str | None:
        available = {"caption": bool(self._captions(index, lang)), "qa": bool(self._qa(index, lang)),
                     "detect": bool(self._eligible(index)) or bool(self._absent(index))}
        tasks = [t for t, ok in available.items() if ok and self.task_weights.get(t, 0) > 0]
        if not tasks:
            return None
        return rng.choices(tasks, weights=[self.task_weights[t] for t in tasks])[0]

    def _make_task(self, task: str, index: int, lang: str, frame: tuple[int, int, int], rng: random.Random):
        if task == "caption":
            return self.book.prompt("caption", lang, rng), rng.choice(self._captions(index, lang))
        if task == "qa":
            return rng.choice(self._qa(index, lang))
        absent = self._absent(index)
        eligible = self._eligible(index)
        if absent and (not eligible or rng.random() < self.negative_rate):
            label = self.book.label(rng.choice(absent), lang, rng)
            return self.book.prompt("detect", lang, rng, label=label), format_boxes([])
        category = rng.choice(eligible)
        label = self.book.label(category, lang, rng)
        width, height, orientation = frame
        objects = self._objects(index)
        chosen = self.boxes[objects][self.box_category[objects] == self.names.index(category)]
        boxes = []
        for x1, y1, x2, y2 in chosen.tolist():
            unit = _turn_box((x1 / width, y1 / height, x2 / width, y2 / height), orientation)
            boxes.append({"label": label, "box": to_relative(unit, 1, 1)})
        boxes.sort(key=lambda b: (b["box"][1], b["box"][0]))
        return self.book.prompt("detect", lang, rng, label=label), format_boxes(boxes)


def _read_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError as err:
        raise VlmgraftError(f"data file {str(path)!r} does not exist") from err
    except json.JSONDecodeError as err:
        raise VlmgraftError(f"{path} is not valid JSON: line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(data, dict):
        raise VlmgraftError(f"{path} must hold a JSON object")
    return data
