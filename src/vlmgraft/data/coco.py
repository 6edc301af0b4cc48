"""Detection data (COCO json; Objects365 uses the same layout) turned into grounding conversations.

Each image becomes one sample of `turns` question/answer pairs, each task drawn at random (seeded by image id) from:
- `caption`: when the json holds captions (COCO captions `annotations` with a `caption`, or a top-level `captions`
  list of `{image_id, caption, lang?}`);
- `qa`: when the json holds a top-level `qa` list of `{image_id, question, answer, lang?}` (a vlmgraft extension);
- `detect`: "find every {label}" for a class present at most `max_boxes` times (crowd boxes excluded), answered
  `<box>[{"label": ..., "box": [x1, y1, x2, y2]}]</box>` with 0–1000 integers; with probability `negative_rate`
  the class is one that is absent, answered `<box>[]</box>` alone.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from vlmgraft.data.images import DEFAULT_POLICY, ImagePolicy
from vlmgraft.data.prompts import LANGS, PromptBook
from vlmgraft.data.sample import Sample
from vlmgraft.data.source import RowRejected, Source, decode_images
from vlmgraft.errors import VlmgraftError
from vlmgraft.grounding import format_boxes, to_relative

TASK_WEIGHTS = {"caption": 1.0, "qa": 1.0, "detect": 2.0}


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
        self.categories = {c["id"]: c["name"] for c in data.get("categories") or [] if "id" in c and "name" in c}
        self.images: list[tuple[int, str, int, int]] = []
        for n, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                self.problems.append(RowRejected(f"{path}[images][{n}]", "an image needs 'id' and 'file_name'"))
                continue
            self.images.append((image["id"], image["file_name"], int(image.get("width") or 0),
                                int(image.get("height") or 0)))
        self.objects: dict[int, list[tuple[str, list[float], bool]]] = defaultdict(list)
        self.captions: dict[int, list[tuple[str, str | None]]] = defaultdict(list)
        self.qa: dict[int, list[tuple[str, str, str | None]]] = defaultdict(list)
        self._collect(path, data, captions)
        self.images_dir = self._find_images_dir(path, images_dir)

    def _collect(self, path: Path, data: dict, captions_file) -> None:
        for n, ann in enumerate(data["annotations"]):
            origin = f"{path}[annotations][{n}]"
            if not isinstance(ann, dict) or "image_id" not in ann:
                self.problems.append(RowRejected(origin, "an annotation needs 'image_id'"))
            elif "caption" in ann and "bbox" not in ann:
                self.captions[ann["image_id"]].append((str(ann["caption"]).strip(), ann.get("lang")))
            elif not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4) \
                    or ann.get("category_id") not in self.categories:
                self.problems.append(RowRejected(origin, "needs a 4-number 'bbox' and a known 'category_id'"))
            else:
                box = [float(v) for v in ann["bbox"]]
                self.objects[ann["image_id"]].append((self.categories[ann["category_id"]], box,
                                                      bool(ann.get("iscrowd", 0))))
        extra = _read_json(Path(captions_file)).get("annotations", []) if captions_file else []
        for entry in [*(data.get("captions") or []), *extra]:
            if isinstance(entry, dict) and "image_id" in entry and entry.get("caption"):
                self.captions[entry["image_id"]].append((str(entry["caption"]).strip(), entry.get("lang")))
        for entry in data.get("qa") or []:
            if isinstance(entry, dict) and "image_id" in entry and entry.get("question") and entry.get("answer"):
                self.qa[entry["image_id"]].append((str(entry["question"]), str(entry["answer"]), entry.get("lang")))

    def _find_images_dir(self, path: Path, images_dir) -> Path:
        if images_dir is not None:
            return Path(images_dir).expanduser()
        candidates = [path.parent, path.parent / "images", path.parent.parent / "images"]
        if self.images:
            first = self.images[0][1]
            for folder in candidates:
                if (folder / first).exists():
                    return folder
        return path.parent

    def __len__(self) -> int:
        return len(self.images)

    def origin(self, index: int) -> str:
        return f"{self.path}[image_id={self.images[index][0]}]"

    def raw(self, index: int) -> tuple:
        return self.images[index]

    def iter_raw(self, shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, tuple]]:
        for index in range(shard, len(self.images), num_shards):
            yield index, self.images[index]

    def to_sample(self, index: int, raw: tuple) -> Sample:
        image_id, file_name, width, height = raw
        origin = f"{self.path}[image_id={image_id}]"
        [image] = decode_images([self.images_dir / file_name], None, self.policy, origin)
        width, height = (width, height) if width and height else image.size
        rng = random.Random(f"{self.seed}:{image_id}")
        messages = []
        for turn in range(self.turns):
            lang = rng.choice(LANGS) if self.lang == "both" else self.lang
            task = self._choose_task(image_id, lang, rng)
            if task is None:
                break
            question, answer = self._make_task(task, image_id, lang, width, height, rng)
            parts = [{"type": "image"}] if turn == 0 else []
            messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
            messages.append({"role": "assistant", "content": answer})
        if not messages:
            raise RowRejected(origin, "no caption, QA or usable class to ask about")
        return Sample(messages=messages, images=[image], source=self.name, origin=origin)

    def _eligible(self, image_id) -> list[str]:
        counts: dict[str, int] = defaultdict(int)
        crowded = set()
        for category, _, crowd in self.objects.get(image_id, []):
            counts[category] += 1
            if crowd:
                crowded.add(category)
        return sorted(c for c, n in counts.items() if n <= self.max_boxes and c not in crowded)

    def _absent(self, image_id) -> list[str]:
        present = {c for c, _, _ in self.objects.get(image_id, [])}
        return sorted(set(self.categories.values()) - present)

    def _captions(self, image_id, lang) -> list[str]:
        return [text for text, cap_lang in self.captions.get(image_id, []) if cap_lang in (None, lang)]

    def _qa(self, image_id, lang) -> list[tuple[str, str]]:
        return [(q, a) for q, a, qa_lang in self.qa.get(image_id, []) if qa_lang in (None, lang)]

    def _choose_task(self, image_id, lang: str, rng: random.Random) -> str | None:
        available = {"caption": bool(self._captions(image_id, lang)), "qa": bool(self._qa(image_id, lang)),
                     "detect": bool(self._eligible(image_id)) or bool(self._absent(image_id))}
        tasks = [t for t, ok in available.items() if ok and self.task_weights.get(t, 0) > 0]
        if not tasks:
            return None
        return rng.choices(tasks, weights=[self.task_weights[t] for t in tasks])[0]

    def _make_task(self, task: str, image_id, lang: str, width: int, height: int, rng: random.Random):
        if task == "caption":
            return self.book.prompt("caption", lang, rng), rng.choice(self._captions(image_id, lang))
        if task == "qa":
            return rng.choice(self._qa(image_id, lang))
        absent = self._absent(image_id)
        eligible = self._eligible(image_id)
        if absent and (not eligible or rng.random() < self.negative_rate):
            label = self.book.label(rng.choice(absent), lang, rng)
            return self.book.prompt("detect", lang, rng, label=label), format_boxes([])
        category = rng.choice(eligible)
        label = self.book.label(category, lang, rng)
        boxes = []
        for name, (x, y, w, h), _ in self.objects[image_id]:
            if name == category:
                boxes.append({"label": label, "box": to_relative((x, y, x + w, y + h), width, height)})
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
