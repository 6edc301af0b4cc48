"""The shapes world: synthetic scenes of coloured shapes with captions, questions and boxes, in zh and en.

For tests, the demo and benchmarks: every scene is a pure function of (seed, index), so data is reproducible without
files. `ShapesWorld` returns `Sample` lists directly (`vqa_samples`, `caption_samples`, `grounding_samples`), Chinese
or English text (`text_corpus`), and writes any reader format to disk (`write`, see `shapes_io`).

    world = ShapesWorld(image_size=64, palette=("red", "green", "blue", "yellow"), max_shapes=1, seed=0)
    world.vqa_samples(100, lang="zh", kind="colour")   # "图中形状是什么颜色？" → "红色" (4 choices, 25% chance)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlmgraft.data.sample import Sample

COLOURS = {  # name → (zh, RGB); distinct hues so a tiny vision tower can tell them apart
    "red": ("红色", (220, 40, 40)), "green": ("绿色", (40, 170, 60)), "blue": ("蓝色", (40, 80, 220)),
    "yellow": ("黄色", (235, 200, 30)), "purple": ("紫色", (140, 60, 180)), "orange": ("橙色", (245, 130, 20)),
    "black": ("黑色", (20, 20, 20)), "white": ("白色", (250, 250, 250)),
}
KINDS = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
POSITIONS = {  # (row, col) of the shape's centre on a 3×3 grid
    (0, 0): ("左上", "top left"), (0, 1): ("上方", "top"), (0, 2): ("右上", "top right"),
    (1, 0): ("左侧", "left"), (1, 1): ("中间", "center"), (1, 2): ("右侧", "right"),
    (2, 0): ("左下", "bottom left"), (2, 1): ("下方", "bottom"), (2, 2): ("右下", "bottom right"),
}
ZH_DIGITS = "零一二三四五六七八九十"
QA_KINDS = ("colour", "shape", "count", "position")

# (canonical, *paraphrases) per question kind, language and scene type ("one" shape or "many").
QUESTIONS = {
    ("colour", "zh", "one"): ["图中形状是什么颜色？", "这个图形是什么颜色的？", "图里的形状是哪种颜色？"],
    ("colour", "zh", "many"): ["图中的{kind}是什么颜色？", "{kind}是什么颜色的？"],
    ("colour", "en", "one"): ["What colour is the shape in the image?", "Which colour does the shape have?"],
    ("colour", "en", "many"): ["What colour is the {kind}?", "Which colour is the {kind} in the picture?"],
    ("shape", "zh", "one"): ["图中是什么形状？", "这是一个什么图形？"],
    ("shape", "zh", "many"): ["图中{colour}的是什么形状？", "{colour}的图形是什么形状？"],
    ("shape", "en", "one"): ["What shape is in the image?", "Which shape do you see?"],
    ("shape", "en", "many"): ["What shape is {colour}?", "Which shape in the picture is {colour}?"],
    ("count", "zh", "one"): ["图中有几个形状？", "图里一共有多少个图形？"],
    ("count", "en", "one"): ["How many shapes are in the image?", "Count the shapes in the picture."],
    ("position", "zh", "one"): ["图中形状在什么位置？", "这个图形在图的哪里？"],
    ("position", "zh", "many"): ["{kind}在图中的什么位置？", "图里的{kind}在哪里？"],
    ("position", "en", "one"): ["Where is the shape in the image?", "Where in the picture is the shape?"],
    ("position", "en", "many"): ["Where is the {kind}?", "Where in the picture is the {kind}?"],
}
CAPTION_PROMPTS = {"zh": ["请描述这张图片。", "图里有什么？", "用一句话描述这幅图。"],
                   "en": ["Describe the image.", "What is in this picture?", "Write a short caption."]}


def zh_number(n: int, counting: bool = True) -> str:
    """Chinese numeral; with a measure word (`counting`) 2 is 两, as in 两个."""
    if n == 2 and counting:
        return "两"
    if n <= 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + (ZH_DIGITS[ones] if ones else "")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # pixel x1, y1, x2, y2 (x2, y2 exclusive)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        cx, cy = (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2
        return min(2, int(3 * cy / height)), min(2, int(3 * cx / width))

    def name(self, lang: str) -> str:
        return KINDS[self.kind] if lang == "zh" else self.kind

    def colour_name(self, lang: str) -> str:
        return COLOURS[self.colour][0] if lang == "zh" else self.colour


@dataclass
class Scene:
    index: int
    image: Image.Image
    shapes: list[Shape]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def position(self, shape: Shape, lang: str) -> str:
        zh, en = POSITIONS[shape.grid(*self.size)]
        return zh if lang == "zh" else en

    def caption(self, lang: str) -> str:
        if lang == "zh":
            parts = [f"{self.position(s, 'zh')}有一个{s.colour_name('zh')}的{s.name('zh')}" for s in self.shapes]
            return "，".join(parts) + "。"
        parts = [f"a {s.colour} {s.kind} {_en_place(self.position(s, 'en'))}" for s in self.shapes]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class ShapesWorld:
    """Deterministic generator of shape scenes and the samples made from them.

    `palette`: colour names from COLOURS; `kinds`: shape kinds from KINDS; `min_shapes..max_shapes` shapes a scene;
    `noise` in [0, 1]: strength of the background's pixel noise (0 = plain). `image_size` is an int (square) or
    (width, height).
    """

    def __init__(self, image_size: int | tuple[int, int] = 64, palette=("red", "green", "blue", "yellow"),
                 kinds=tuple(KINDS), min_shapes: int = 1, max_shapes: int = 1, noise: float = 0.0, seed: int = 0):
        unknown = [c for c in palette if c not in COLOURS] + [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown colour/kind {unknown}; colours: {list(COLOURS)}, kinds: {list(KINDS)}")
        if not 1 <= min_shapes <= max_shapes:
            raise ValueError("need 1 <= min_shapes <= max_shapes")
        self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.palette, self.kinds = tuple(palette), tuple(kinds)
        self.min_shapes, self.max_shapes, self.noise, self.seed = min_shapes, max_shapes, noise, seed

    # -- scenes ------------------------------------------------------------------------------------------------------
    def _rng(self, index: int, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}:{purpose}:{index}")

    def scene(self, index: int) -> Scene:
        rng = self._rng(index, "scene")
        width, height = self.size
        count = rng.randint(self.min_shapes, self.max_shapes)
        colours = _draw(self.palette, count, rng)
        kinds = _draw(self.kinds, count, rng)
        shapes: list[Shape] = []
        side_max = max(4, int(min(width, height) * (0.5 if count == 1 else 0.9 / math.sqrt(count + 1))))
        for colour, kind in zip(colours, kinds, strict=True):
            for _attempt in range(30):  # place without overlap; after 30 tries accept an overlap
                side = rng.randint(max(3, side_max // 2), side_max)
                x, y = rng.randint(0, width - side), rng.randint(0, height - side)
                box = (x, y, x + side, y + side)
                if all(_apart(box, s.box) for s in shapes):
                    break
            shapes.append(Shape(kind, colour, box))
        return Scene(index, self._paint(shapes, rng), shapes)

    def _paint(self, shapes: list[Shape], rng: random.Random) -> Image.Image:
        width, height = self.size
        grey = rng.randint(200, 245)
        if self.noise > 0:
            noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 60 * self.noise, (height, width, 3))
            image = Image.fromarray(np.clip(grey + noise, 0, 255).astype(np.uint8), "RGB")
        else:
            image = Image.new("RGB", (width, height), (grey, grey, grey))
        draw = ImageDraw.Draw(image)
        for shape in shapes:
            fill = COLOURS[shape.colour][1]
            x1, y1, x2, y2 = shape.box
            if shape.kind == "circle":
                draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
            elif shape.kind == "square":
                draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
            elif shape.kind == "triangle":
                draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
            else:
                draw.polygon(_star(x1, y1, x2 - 1, y2 - 1), fill=fill)
        return image

    # -- samples -----------------------------------------------------------------------------------------------------
    def answer_choices(self, kind: str, lang: str) -> list[str]:
        """Every answer a closed question of `kind` can have in this world (for scoring and chance level)."""
        if kind == "colour":
            return [COLOURS[c][0] if lang == "zh" else c for c in self.palette]
        if kind == "shape":
            return [KINDS[k] if lang == "zh" else k for k in self.kinds]
        if kind == "position":
            return [zh if lang == "zh" else en for zh, en in POSITIONS.values()]
        if kind == "count":
            return [f"{n}个" if lang == "zh" else str(n) for n in range(self.min_shapes, self.max_shapes + 1)]
        raise ValueError(f"unknown question kind {kind!r}; expected one of {QA_KINDS}")

    def question(self, scene: Scene, kind: str, lang: str, varied: bool = False) -> tuple[str, str]:
        """(question, answer) about a scene; `varied` draws a paraphrase, otherwise the canonical wording."""
        rng = self._rng(scene.index, f"q:{kind}:{lang}")
        shapes = scene.shapes
        many = len(shapes) > 1
        if kind == "count" or (kind in ("colour", "position") and many and not _unique(shapes, "kind")) \
                or (kind == "shape" and many and not _unique(shapes, "colour")):
            kind, many = "count", False
        target = rng.choice(_unique(shapes, "colour" if kind == "shape" else "kind")) if many else shapes[0]
        templates = QUESTIONS[(kind, lang, "many" if many else "one")]
        text = (rng.choice(templates) if varied else templates[0]).format(kind=target.name(lang),
                                                                         colour=target.colour_name(lang))
        if kind == "colour":
            answer = target.colour_name(lang)
        elif kind == "shape":
            answer = target.name(lang)
        elif kind == "position":
            answer = scene.position(target, lang)
        else:
            answer = f"{len(shapes)}个" if lang == "zh" else str(len(shapes))
        return text, answer

    def vqa_samples(self, n: int, lang: str = "zh", kind: str = "colour", start: int = 0,
                    varied: bool = False) -> list[Sample]:
        """One question per scene; `kind` is one of QA_KINDS or "mixed" (a kind drawn per scene)."""
        samples = []
        for index in range(start, start + n):
            scene = self.scene(index)
            chosen = self._rng(index, "kind").choice(QA_KINDS) if kind == "mixed" else kind
            question, answer = self.question(scene, chosen, lang, varied)
            samples.append(_sample(scene, question, answer, f"shapes-vqa-{lang}"))
        return samples

    def caption_samples(self, n: int, lang: str = "en", start: int = 0, varied: bool = False) -> list[Sample]:
        samples = []
        for index in range(start, start + n):
            scene = self.scene(index)
            prompts = CAPTION_PROMPTS[lang]
            prompt = self._rng(index, "caption").choice(prompts) if varied else prompts[0]
            samples.append(_sample(scene, prompt, scene.caption(lang), f"shapes-caption-{lang}"))
        return samples

    def grounding_samples(self, n: int, lang: str = "zh", start: int = 0) -> list[Sample]:
        """'Find every {kind}' → `<box>[...]</box>` (all shapes of that kind; 0–1000 coordinates)."""
        from vlmgraft.data.prompts import PromptBook
        from vlmgraft.grounding import format_boxes, to_relative

        book, samples = PromptBook(), []
        for index in range(start, start + n):
            scene, rng = self.scene(index), self._rng(index, "ground")
            kind = rng.choice(sorted({s.kind for s in scene.shapes}))
            label = KINDS[kind] if lang == "zh" else kind
            boxes = [{"label": label, "box": to_relative(s.box, *scene.size)} for s in scene.shapes if s.kind == kind]
            boxes.sort(key=lambda b: (b["box"][1], b["box"][0]))
            question = book.prompt("detect", lang, rng, label=label)
            samples.append(_sample(scene, question, format_boxes(boxes), f"shapes-ground-{lang}"))
        return samples

    def text_corpus(self, n: int, lang: str = "zh", start: int = 0) -> list[str]:
        """Text-only sentences about colours, shapes, positions and counts (to teach a tiny LLM the language)."""
        lines = []
        for index in range(start, start + n):
            scene, rng = self.scene(index), self._rng(index, "text")
            style = rng.randrange(4)
            if style == 0:
                lines.append(scene.caption(lang) if lang == "zh" else scene.caption(lang).capitalize() + ".")
            elif style == 1:
                count = len(scene.shapes)
                lines.append(f"图中一共有{zh_number(count)}个形状。" if lang == "zh"
                             else f"There {'is one shape' if count == 1 else f'are {count} shapes'} in the picture.")
            elif style == 2:
                shape = rng.choice(scene.shapes)
                lines.append(f"这个{shape.name('zh')}是{shape.colour_name('zh')}的。" if lang == "zh"
                             else f"The {shape.kind} is {shape.colour}.")
            else:
                question, answer = self.question(scene, rng.choice(QA_KINDS), lang, varied=True)
                lines.append(f"问：{question}答：{answer}。" if lang == "zh" else f"Q: {question} A: {answer}.")
        return lines

    def write(self, out_dir, fmt: str, n: int, lang: str = "zh", task: str = "mixed", start: int = 0):
        """Write n scenes in a reader format; returns the SPEC path to read them back. See `shapes_io.write_world`."""
        from vlmgraft.data.shapes_io import write_world

        return write_world(self, out_dir, fmt, n, lang=lang, task=task, start=start)


def _sample(scene: Scene, question: str, answer: str, source: str) -> Sample:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]
    return Sample(messages=messages, images=[scene.image], source=source, origin=f"shapes[{scene.index}]")


def _en_place(position: str) -> str:
    if position == "center":
        return "in the center"
    return f"on the {position}" if position in ("left", "right") else f"at the {position}"


def _draw(pool: tuple, count: int, rng: random.Random) -> list:
    """`count` items: distinct while the pool lasts, then with repeats."""
    items = rng.sample(pool, min(count, len(pool)))
    return items + [rng.choice(pool) for _ in range(count - len(items))]


def _unique(shapes: list[Shape], attribute: str) -> list[Shape]:
    values = [getattr(s, attribute) for s in shapes]
    return [s for s in shapes if values.count(getattr(s, attribute)) == 1]


def _apart(a: tuple, b: tuple, gap: int = 1) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _star(x1: float, y1: float, x2: float, y2: float) -> list[tuple[float, float]]:
    cx, cy, outer = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else outer * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points
