"""The COCO/Objects365 reader: grounding tasks, boxes in the frame the model sees (hand-worked numbers on non-square
and EXIF-turned images), malformed annotations skipped by id, class names in zh, and compact annotation storage."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmgraft.data.coco import CocoSource
from vlmgraft.data.shapes import ShapesWorld
from vlmgraft.data.spec import detect_format
from vlmgraft.errors import VlmgraftError
from vlmgraft.grounding import iou, parse_boxes


def _texts(sample):
    return [(m["role"], m["content"] if isinstance(m["content"], str)
             else ["<img>" if p["type"] == "image" else p["text"] for p in m["content"]]) for m in sample.messages]


def test_coco_grounding_tasks(tmp_path):
    world = ShapesWorld(image_size=64, max_shapes=3, seed=5)
    path = world.write(tmp_path, "coco", 30)
    assert detect_format(str(path)) == "coco"
    source = CocoSource(path, lang="en", task_weights={"caption": 0, "qa": 0, "detect": 1}, negative_rate=0.0)
    for index in range(len(source)):
        sample = source.get(index)
        question, answer = sample.messages[0]["content"][1]["text"], sample.messages[1]["content"]
        boxes = parse_boxes(answer)
        assert boxes, answer
        scene = world.scene(index)
        kind = boxes[0].label
        assert kind in question
        truth = [s for s in scene.shapes if s.kind == kind]
        assert len(boxes) == len(truth)
        for box in boxes:  # every answer box matches a true box of that class
            pixel = [b for b in box.to_pixels(64, 64)]
            best = max(iou(box, _rel(t.box)) for t in truth)
            assert best > 0.95 and all(0 <= v <= 64 for v in pixel)
    negatives = CocoSource(path, lang="zh", task_weights={"caption": 0, "qa": 0, "detect": 1}, negative_rate=1.0)
    for index in range(10):
        sample = negatives.get(index)
        assert sample.messages[1]["content"] == "<box>[]</box>"
        asked = sample.messages[0]["content"][1]["text"]
        present = {s.name("zh") for s in world.scene(index).shapes}
        assert not any(name in asked for name in present)  # a negative asks about an absent class
    mixed = CocoSource(path, lang="zh", turns=3, seed=1)
    kinds = set()
    for index in range(len(mixed)):
        sample = mixed.get(index)
        assert sum(1 for m in sample.messages if m["role"] == "assistant") == 3
        for message in sample.messages[1::2]:
            kinds.add("detect" if message["content"].startswith("<box>") else "text")
    assert kinds == {"detect", "text"}
    again = CocoSource(path, lang="zh", turns=3, seed=1)
    assert _texts(again.get(7)) == _texts(mixed.get(7))  # deterministic by seed and image id


def _rel(box):
    from vlmgraft.grounding import Box, to_relative

    return Box("", *to_relative(box, 64, 64))


def test_coco_max_boxes_prompts_file_and_synonyms(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}]
    Image.new("RGB", (100, 50)).save(tmp_path / "a.png")
    annotations = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [i, 0, 5, 5]} for i in range(4)]
    annotations.append({"id": 9, "image_id": 1, "category_id": 2, "bbox": [10, 10, 50, 20]})
    path = tmp_path / "inst.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]}))
    extra = tmp_path / "prompts.yaml"
    extra.write_text("prompts:\n  detect:\n    zh: ['把{label}都框出来']\nreplace_prompts: true\n"
                     "synonyms:\n  dog: {zh: [小狗]}\n")
    source = CocoSource(path, lang="zh", max_boxes=3, negative_rate=0.0, prompts=extra)
    sample = source.get(0)  # 4 people > max_boxes: only the dog may be asked about
    assert sample.messages[0]["content"][1]["text"] == "把小狗都框出来"
    assert json.loads(sample.messages[1]["content"][5:-6]) == [{"label": "小狗", "box": [100, 200, 600, 600]}]
    with pytest.raises(VlmgraftError, match="label"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"prompts": {"detect": {"en": ["no slot here"]}}}))
        CocoSource(path, prompts=bad)


def _write_coco(folder, images: list[dict], annotations: list[dict], names=("dog",), pictures=None):
    """A COCO json of `images` (each drawn as `pictures[file_name]` or a black image of its `size`, with an optional
    EXIF `orientation`) and `annotations`, whose category ids are 1.. in the order of `names`."""
    for entry in images:
        picture = (pictures or {}).get(entry["file_name"]) or Image.new("RGB", entry.pop("size"), (0, 0, 0))
        exif = Image.Exif()
        exif[0x0112] = entry.pop("orientation", 1)
        picture.save(folder / entry["file_name"], "PNG", exif=exif.tobytes())
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}))
    return path


def _detect_answer(path, **options) -> list:
    source = CocoSource(path, task_weights={"caption": 0, "qa": 0, "detect": 1}, negative_rate=0.0, **options)
    answer = source.get(0).messages[1]["content"]
    return json.loads(answer[len("<box>"):-len("</box>")])


# A 200×100 stored image holding one box at x 20–80, y 10–50 (COCO bbox [20, 10, 60, 40]); expected 0–1000 boxes are
# worked out by hand in the frame the model sees (after EXIF orientation), e.g. orientation 6 shows it 100×200 with the
# box at x 50–90 (100 − y), y 20–80 (x): [500, 100, 900, 400].
@pytest.mark.parametrize("size, orientation, json_size, bbox, expected", [
    ((200, 100), 1, (200, 100), [20, 10, 60, 40], [100, 100, 400, 500]),
    ((100, 50), 1, (200, 100), [20, 10, 60, 40], [100, 100, 400, 500]),  # stored at half size, annotated full size
    ((200, 100), 6, (200, 100), [20, 10, 60, 40], [500, 100, 900, 400]),  # annotated on the stored pixels
    ((200, 100), 6, (100, 200), [50, 20, 40, 60], [500, 100, 900, 400]),  # annotated on the upright image
    ((200, 100), 6, (0, 0), [20, 10, 60, 40], [500, 100, 900, 400]),  # no size in the json: the stored pixels
    ((200, 100), 8, (200, 100), [20, 10, 60, 40], [100, 600, 500, 900]),
    ((200, 100), 3, (200, 100), [20, 10, 60, 40], [600, 500, 900, 900]),
])
def test_coco_boxes_are_normalised_in_the_frame_the_model_sees(tmp_path, size, orientation, json_size, bbox,
                                                               expected):
    path = _write_coco(tmp_path, [{"id": 7, "file_name": "a.png", "size": size, "orientation": orientation,
                                   "width": json_size[0], "height": json_size[1]}],
                       [{"id": 1, "image_id": 7, "category_id": 1, "bbox": bbox}])
    assert _detect_answer(path, lang="en") == [{"label": "dog", "box": expected}]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_coco_boxes_land_on_the_pixels_the_loader_shows(tmp_path, orientation):
    stored = Image.new("RGB", (200, 100), (0, 0, 0))
    stored.paste((255, 255, 255), (20, 10, 80, 50))
    path = _write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "orientation": orientation, "width": 200,
                                   "height": 100}], [{"id": 1, "image_id": 1, "category_id": 1,
                                                      "bbox": [20, 10, 60, 40]}], pictures={"a.png": stored})
    [answer] = _detect_answer(path, lang="en")
    shown = CocoSource(path).get(0).images[0]  # PIL turns the pixels; the box must follow them
    width, height = shown.size
    pixels = [answer["box"][i] * (width if i % 2 == 0 else height) / 1000 for i in range(4)]
    assert max(abs(a - b) for a, b in zip(pixels, shown.getbbox(), strict=True)) <= 1


def test_coco_malformed_annotations_are_skipped_and_counted_by_id(tmp_path):
    good = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}
    bad = [{"id": 2, "image_id": 1, "category_id": 1, "bbox": None},
           {"id": 3, "image_id": 1, "category_id": 1, "bbox": [None, 1, 2, 3]},
           {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 2, "x", 4]},
           {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 2, 0, 4]},
           {"id": 6, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]},
           {"id": 7, "image_id": 1, "category_id": 99, "bbox": [1, 2, 3, 4]},
           {"id": 8, "image_id": 42, "category_id": 1, "bbox": [1, 2, 3, 4]}]
    path = _write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "size": (100, 100), "width": "wide",
                                   "height": 1e12}, {"id": "x", "file_name": "b.png", "size": (8, 8)}],
                       [good, *bad])
    source = CocoSource(path, lang="en")
    # unusable json sizes fall back to the image's own 100×100
    assert len(source) == 1 and _detect_answer(path, lang="en") == [{"label": "dog", "box": [100, 100, 300, 300]}]
    messages = [str(p) for p in source.problems]
    assert len(messages) == len(bad) + 1  # the image with a string id too
    for entry in bad:
        assert any(f"annotation id={entry['id']}" in m for m in messages)
    assert any("null" in m for m in messages) and any("99" in m for m in messages) and any("42" in m for m in messages)


def test_coco_classes_without_a_chinese_name_are_logged_once_and_a_prompts_file_names_them(tmp_path, caplog):
    path = _write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "size": (64, 32)}],
                       [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8]}], names=("sneakers", "dog"))
    with caplog.at_level("WARNING", logger="vlmgraft.data.coco"):
        source = CocoSource(path, lang="zh")
    assert source.untranslated == ["sneakers"]
    assert len([r for r in caplog.records if "sneakers" in r.getMessage()]) == 1 and "狗" not in caplog.text
    assert _detect_answer(path, lang="zh")[0]["label"] == "sneakers"  # kept, not dropped
    names = tmp_path / "names.yaml"
    names.write_text("synonyms:\n  sneakers: {zh: [运动鞋]}\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmgraft.data.coco"):
        assert _detect_answer(path, lang="zh", prompts=names)[0]["label"] == "运动鞋"
    assert not caplog.records


def _python_objects(root) -> int:
    import gc
    import types

    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return len(seen)


def test_coco_annotations_are_not_held_as_python_objects(tmp_path):
    images = [{"id": i, "file_name": "a.png", "width": 64, "height": 64} for i in range(4)]
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")

    def source(boxes_per_image: int) -> CocoSource:
        annotations = [{"id": n, "image_id": n % 4, "category_id": 1, "bbox": [n % 50, 1, 5, 5]}
                       for n in range(4 * boxes_per_image)]
        path = tmp_path / f"{boxes_per_image}.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": 1, "name": "dog"}]}))
        return CocoSource(path, lang="en")

    few, many = source(2), source(500)
    assert int(many.box_starts[-1]) == 2000
    assert _python_objects(many) == _python_objects(few)  # 2000 boxes cost no more Python objects than 8
