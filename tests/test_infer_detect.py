"""`vlmgraft detect`: prompt language, 0–1000 → original-pixel mapping, drawing CJK labels, the command end to end."""

from __future__ import annotations

import json

from PIL import Image

from vlmgraft.cli import main
from vlmgraft.grounding import Box, format_boxes, parse_boxes
from vlmgraft.infer import detect as detect_module
from vlmgraft.infer.detect import boxes_to_pixels, draw_boxes, grounding_prompt, language_of
from vlmgraft.infer.generate import GenerationResult


def test_prompt_language_follows_the_class_names():
    assert language_of(["苹果", "dog"]) == "zh" and language_of(["apple", "dog"]) == "en"
    zh = grounding_prompt(["苹果", "狗"])
    assert "苹果、狗" in zh and not any(c.isascii() and c.isalpha() for c in zh.replace("box", ""))
    en = grounding_prompt(["apple", "dog"])
    assert "apple, dog" in en and en.isascii()
    assert "apple" in grounding_prompt(["apple"], lang="zh") and grounding_prompt(["apple"], lang="zh") != en


def test_boxes_scale_by_the_original_width_and_height_and_clamp():
    boxes = parse_boxes(format_boxes([{"label": "狗", "box": [100, 200, 500, 800]},
                                      {"label": "cat", "box": [0, 0, 1000, 1000]}]))
    wide = boxes_to_pixels(boxes, 640, 480)
    assert wide[0] == {"label": "狗", "box": [64, 96, 320, 384], "box_1000": [100, 200, 500, 800]}
    assert wide[1]["box"] == [0, 0, 640, 480]
    tall = boxes_to_pixels(boxes, 300, 1200)  # non-square the other way: x scales by width, y by height
    assert tall[0]["box"] == [30, 240, 150, 960]
    assert boxes_to_pixels([Box("x", 0, 0, 1000, 1000)], 1, 1)[0]["box"] == [0, 0, 1, 1]


def test_drawing_outlines_each_box_and_survives_cjk_labels():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    drawn = draw_boxes(image, [{"label": "苹果", "box": [20, 30, 120, 90]}, {"label": "dog", "box": [150, 5, 190, 50]}])
    assert drawn.size == image.size and image.getpixel((20, 60)) == (255, 255, 255)  # the input is untouched
    assert drawn.getpixel((20, 60)) != (255, 255, 255) and drawn.getpixel((120, 60)) != (255, 255, 255)
    assert drawn.getpixel((70, 60)) == (255, 255, 255)  # outline only, inside stays clear
    assert drawn.getpixel((190, 40)) != (255, 255, 255)


def test_detect_command_maps_the_answer_to_pixels_and_writes_a_png(tiny_graft, tmp_path, monkeypatch, capsys):
    source = tmp_path / "scene.png"
    Image.new("RGB", (640, 480), (90, 140, 200)).save(source)
    asked = {}

    def fake_generate(model, processor, conversations, images, **kwargs):
        asked.update(texts=[c[0]["content"][1]["text"] for c in conversations], sizes=[i[0].size for i in images],
                     **kwargs)
        dog = format_boxes([{"label": "狗", "box": [100, 200, 500, 800]}])
        return [GenerationResult(dog, None, dog, 10, 5, "stop"), GenerationResult("<box>[]</box>", None, "", 9, 3,
                                                                                   "stop")]

    monkeypatch.setattr("vlmgraft.infer.generate.generate", fake_generate)
    out = tmp_path / "boxes.png"
    code = main(["detect", str(tiny_graft), "--image", str(source), "--classes", "狗,猫", "--json", "--out", str(out),
                 "--device", "cpu"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["boxes"] == [{"label": "狗", "box": [64, 96, 320, 384], "box_1000": [100, 200, 500, 800]}]
    assert result["width"] == 640 and result["parsed"]
    assert asked["texts"] == [grounding_prompt(["狗"]), grounding_prompt(["猫"])]  # one question per class
    assert asked["sizes"] == [(640, 480)] * 2 and asked["enable_thinking"] is False
    assert Image.open(out).size == (640, 480)


def test_detect_boxes_are_in_the_exif_upright_frame(tiny_graft, tmp_path, monkeypatch, capsys):
    source = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 640×480, shown rotated a quarter clockwise: 480 wide, 640 tall
    Image.new("RGB", (640, 480), (90, 140, 200)).save(source, exif=exif.tobytes())
    sizes = []

    def fake_generate(model, processor, conversations, images, **kwargs):
        sizes.extend(i[0].size for i in images)
        return [GenerationResult(format_boxes([{"label": "狗", "box": [100, 200, 500, 800]}]), None, "", 10, 5, "stop")]

    monkeypatch.setattr("vlmgraft.infer.generate.generate", fake_generate)
    out = tmp_path / "boxes.png"
    assert main(["detect", str(tiny_graft), "--image", str(source), "--classes", "狗", "--json", "--out", str(out),
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sizes == [(480, 640)] and (result["width"], result["height"]) == (480, 640)
    assert result["boxes"][0]["box"] == [48, 128, 240, 512]  # 0.1·480, 0.2·640, 0.5·480, 0.8·640
    assert Image.open(out).size == (480, 640)
    found = detect_module.detect(None, None, Image.open(source), ["狗"])  # a raw sideways image is turned too
    assert (found.width, found.height) == (480, 640) and found.boxes[0]["box"] == [48, 128, 240, 512]


def test_detect_with_the_real_tiny_model_reports_an_unparseable_answer(tiny_graft, tmp_path, capsys):
    source = tmp_path / "scene.png"
    Image.new("RGB", (64, 48), (90, 140, 200)).save(source)
    found = detect_module.detect(*_load(tiny_graft), Image.open(source), ["apple"], max_new_tokens=4)
    assert found.width == 64 and isinstance(found.raw, str)
    code = main(["detect", str(tiny_graft), "--image", str(source), "--classes", "apple", "--max-new-tokens", "4",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == (0 if found.parsed else 1)
    assert found.parsed or "held no box list" in captured.err
    assert main(["detect", str(tiny_graft), "--image", str(tmp_path / "missing.png"), "--classes", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _load(folder):
    from vlmgraft.infer.model import load_for_inference

    return load_for_inference(folder, device="cpu")
