"""The shapes world (deterministic scenes, questions with closed answers, captions, Chinese text) and the data CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from vlmgraft.cli import main
from vlmgraft.data.shapes import COLOURS, KINDS, ShapesWorld
from vlmgraft.data.spec import load_samples


def _same(a, b) -> bool:
    return a.messages == b.messages and all(np.array_equal(np.asarray(x), np.asarray(y))
                                            for x, y in zip(a.images, b.images, strict=True))


def test_scenes_are_deterministic_by_seed_and_index():
    world = ShapesWorld(image_size=64, max_shapes=3, noise=0.3, seed=11)
    twin = ShapesWorld(image_size=64, max_shapes=3, noise=0.3, seed=11)
    other = ShapesWorld(image_size=64, max_shapes=3, noise=0.3, seed=12)
    for kind in ("colour", "shape", "count", "position", "mixed"):
        assert all(_same(a, b) for a, b in zip(world.vqa_samples(5, "zh", kind), twin.vqa_samples(5, "zh", kind),
                                                strict=True))
    assert _same(world.vqa_samples(1, "en", start=4)[0], twin.vqa_samples(5, "en")[4])  # index, not call order
    assert not all(_same(a, b) for a, b in zip(world.vqa_samples(5), other.vqa_samples(5), strict=True))
    assert world.text_corpus(20) == twin.text_corpus(20) != other.text_corpus(20)


def test_closed_colour_question_for_the_demo():
    world = ShapesWorld(image_size=64, palette=("red", "green", "blue", "yellow"), max_shapes=1, seed=0)
    choices = world.answer_choices("colour", "zh")
    assert choices == ["红色", "绿色", "蓝色", "黄色"]
    samples = world.vqa_samples(200, "zh", "colour")
    questions = {s.messages[0]["content"][1]["text"] for s in samples}
    answers = [s.messages[1]["content"] for s in samples]
    assert questions == {"图中形状是什么颜色？"} and set(answers) == set(choices)
    assert max(answers.count(c) for c in choices) < 0.4 * len(answers)  # near-uniform: chance stays about 25%
    for sample in samples[:20]:  # the answer is the colour actually painted
        pixels = np.asarray(sample.images[0]).reshape(-1, 3).astype(int)
        english = world.answer_choices("colour", "en")[choices.index(sample.messages[1]["content"])]
        target = np.array(COLOURS[english][1])
        assert (np.abs(pixels - target).sum(1) < 10).sum() > 20


def test_captions_text_corpus_and_world_options():
    world = ShapesWorld(image_size=(80, 60), palette=("red", "blue", "purple"), kinds=("circle", "star"),
                        min_shapes=2, max_shapes=4, seed=5)
    scene = world.scene(0)
    assert scene.image.size == (80, 60) and 2 <= len(scene.shapes) <= 4
    assert {s.colour for s in scene.shapes} <= {"red", "blue", "purple"} and {s.kind for s in scene.shapes} <= {
        "circle", "star"}
    caption = world.caption_samples(1, "en")[0].messages[1]["content"]
    assert re.fullmatch(r"(a (red|blue|purple) (circle|star) (at the|on the|in the) [a-z ]+(, | and )?)+", caption)
    zh = world.text_corpus(30, "zh")
    assert len(zh) == 30 and all(re.search(r"[\u4e00-\u9fff]", line) for line in zh)
    assert any(any(KINDS[k] in line for k in KINDS) for line in zh) and any("个" in line for line in zh)
    boxes = world.grounding_samples(3, "zh")[0].messages[1]["content"]
    assert boxes.startswith("<box>[") and '"label": "' in boxes
    with pytest.raises(ValueError, match="unknown colour"):
        ShapesWorld(palette=("teal",))


@pytest.mark.parametrize("fmt", ["cauldron", "swift", "messages", "coco"])
def test_cli_writes_shapes_data_that_inspect_reads(tmp_path, capsys, fmt):
    assert main(["data", "shapes", str(tmp_path), "--format", fmt, "--n", "6", "--lang", "en", "--seed", "2"]) == 0
    path = capsys.readouterr().out.strip().split(": ")[-1]
    assert len(load_samples(path)) == 6
    assert main(["data", "inspect", path, "--limit", "4"]) == 0
    report = capsys.readouterr().out
    assert "rows        6" in report and "problems: none" in report


def test_cli_inspect_with_model_shows_lengths_mask_and_problems(tmp_path, capsys, tiny_graft):
    world = ShapesWorld(image_size=48, seed=1)
    path = world.write(tmp_path, "swift", 5, lang="zh", task="colour")
    with path.open("a") as handle:
        handle.write(json.dumps({"query": "<image>?", "response": "x", "images": []}) + "\n")
        handle.write(json.dumps({"query": "<image>?", "response": "x", "images": ["images/none.png"]}) + "\n")
    assert main(["data", "inspect", str(path), "--model", str(tiny_graft), "--color", "never", "--examples", "1"]) == 0
    report = capsys.readouterr().out
    assert "image tokens per sample: mean 20" in report
    assert re.search(r"⟦(红|绿|蓝|黄)色<\|im_end\|>⟧", report)  # the answer and its end-of-turn carry loss
    assert "<|image_pad|>×4" in report and "⟦<|im_start|>" not in report
    assert f"{path}:6: 1 <image> tag(s) but 0 image(s)" in report and "none.png" in report
    assert main(["data", "inspect", str(tmp_path / "nope.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
