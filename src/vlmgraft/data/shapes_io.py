"""Write shapes-world scenes to disk in every reader format (`vlmgraft data shapes`, `ShapesWorld.write`).

cauldron → `OUT/shapes.parquet`; swift and messages → `OUT/shapes.jsonl` + `OUT/images/`; coco →
`OUT/annotations.json` + `OUT/images/`, with boxes, captions and the vlmgraft `qa` extension (each tagged with its
language). The returned path is the SPEC that reads the data back.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmgraft.data.sample import Sample
from vlmgraft.data.shapes import KINDS, QA_KINDS, ShapesWorld
from vlmgraft.data.writers import write_cauldron, write_messages, write_swift

TASKS = ("mixed", *QA_KINDS, "caption", "grounding")
WRITE_FORMATS = ("cauldron", "swift", "messages", "coco")


def world_samples(world: ShapesWorld, n: int, lang: str, task: str, start: int = 0) -> list[Sample]:
    """n samples of one task, or "mixed": per scene a question kind or a caption, paraphrased."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "caption":
        return world.caption_samples(n, lang, start, varied=True)
    if task == "grounding":
        return world.grounding_samples(n, lang, start)
    if task != "mixed":
        return world.vqa_samples(n, lang, task, start, varied=True)
    samples = []
    for index in range(start, start + n):
        choice = world._rng(index, "task").choice([*QA_KINDS, "caption"])
        samples += (world.caption_samples(1, lang, index, varied=True) if choice == "caption"
                    else world.vqa_samples(1, lang, choice, index, varied=True))
    return samples


def write_world(world: ShapesWorld, out_dir, fmt: str, n: int, lang: str = "zh", task: str = "mixed",
                start: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "coco":
        return write_coco(world, out, n, start)
    samples = world_samples(world, n, lang, task, start)
    if fmt == "cauldron":
        return write_cauldron(samples, out / "shapes.parquet")
    if fmt == "swift":
        return write_swift(samples, out / "shapes.jsonl")
    if fmt == "messages":
        return write_messages(samples, out / "shapes.jsonl")
    raise ValueError(f"unknown format {fmt!r}; expected one of {WRITE_FORMATS}")


def write_coco(world: ShapesWorld, out: Path, n: int, start: int = 0) -> Path:
    """COCO detection json; captions and QA in both languages, so any `lang` reads it."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": kind, "supercategory": "shape"} for i, kind in enumerate(KINDS)]
    category_id = {c["name"]: c["id"] for c in categories}
    images, annotations, captions, qa = [], [], [], []
    for index in range(start, start + n):
        scene = world.scene(index)
        image_id = index + 1
        name = f"{index:06d}.png"
        scene.image.save(images_dir / name)
        width, height = scene.size
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for shape in scene.shapes:
            x1, y1, x2, y2 = shape.box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id[shape.kind], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for lang in ("zh", "en"):
            captions.append({"image_id": image_id, "caption": scene.caption(lang), "lang": lang})
            for kind in QA_KINDS:
                question, answer = world.question(scene, kind, lang, varied=True)
                qa.append({"image_id": image_id, "question": question, "answer": answer, "lang": lang})
    path = out / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories,
                                "captions": captions, "qa": qa}, ensure_ascii=False))
    return path


__all__ = ["TASKS", "WRITE_FORMATS", "world_samples", "write_world", "write_coco"]
