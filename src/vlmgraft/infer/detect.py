"""`vlmgraft detect`: ask for boxes of named classes, map the 0–1000 answer to pixels, draw them.

Coordinates in answers are relative to the image as displayed (0–1000 of its own width and height, after its EXIF
orientation is applied, as training saw it); the processor's resizing, tiling and padding never change that, so mapping
back is a plain scale by that size, and boxes are drawn on that upright image.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from vlmgraft.grounding import Box, parse_boxes
from vlmgraft.images import load_image

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")

# Fallback wording; the data pipeline's detection templates (what a grounding fine-tune saw) are preferred.
PROMPTS = {
    "zh": "找出图中所有的{label}，用 <box>[...]</box> 给出坐标框。",
    "en": "Find every {label} in the image and answer with its boxes as <box>[...]</box>.",
}
_SEPARATORS = {"zh": "、", "en": ", "}


def _template(lang: str) -> str:
    try:  # the first detection template of the training data, so that inference asks the way training did
        from vlmgraft.data.prompts import PROMPTS as TRAINING_PROMPTS

        template = TRAINING_PROMPTS["detect"][lang][0]
        if "{label}" in template:
            return template
    except (ImportError, KeyError, IndexError, TypeError):
        pass
    return PROMPTS[lang]


FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc", "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc", "/System/Library/Fonts/STHeiti Medium.ttc",
    "/Library/Fonts/Arial Unicode.ttf", "C:/Windows/Fonts/msyh.ttc", "C:/Windows/Fonts/simhei.ttf",
)
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0))


def language_of(classes: list[str]) -> str:
    return "zh" if any(_CJK.search(c) for c in classes) else "en"


def grounding_prompt(classes: list[str], lang: str | None = None) -> str:
    """The question for boxes of these classes (zh when a class name is CJK, else en, unless `lang` says)."""
    lang = lang or language_of(classes)
    if lang not in PROMPTS:
        raise ValueError(f"no grounding prompt for language {lang!r} (have {sorted(PROMPTS)})")
    return _template(lang).format(label=_SEPARATORS[lang].join(classes))


def boxes_to_pixels(boxes: list[Box], width: int, height: int) -> list[dict]:
    """0–1000 boxes → pixel boxes of an image of the ORIGINAL width × height, clamped to the image."""
    out = []
    for box in boxes:
        x1, y1, x2, y2 = box.to_pixels(width, height)
        pixels = [min(max(round(v), 0), limit) for v, limit in ((x1, width), (y1, height), (x2, width), (y2, height))]
        out.append({"label": box.label, "box": pixels,
                    "box_1000": [round(v) for v in (box.x1, box.y1, box.x2, box.y2)]})
    return out


def find_cjk_font() -> str | None:
    """A font file with CJK glyphs, if the system has one (fontconfig first, then well-known paths)."""
    if shutil.which("fc-list"):
        try:
            listed = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=5)
            files = sorted(line.split(":")[0].strip() for line in listed.stdout.splitlines() if line.strip())
            if files:
                return files[0]
        except (OSError, subprocess.SubprocessError):
            pass
    for path in FONT_CANDIDATES:
        if os.path.isfile(path):
            return path
    matches = glob.glob("/usr/share/fonts/**/*CJK*", recursive=True)
    return matches[0] if matches else None


def load_font(size: int, cjk: bool):
    path = find_cjk_font() if cjk else None
    if path:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: list[dict]) -> Image.Image:
    """A copy of `image` with each pixel box outlined and labelled (labels never stop the drawing)."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    line = max(2, min(canvas.size) // 200)
    font = load_font(max(12, min(canvas.size) // 30), any(_CJK.search(b["label"]) for b in boxes))
    colours: dict[str, tuple] = {}
    for item in boxes:
        colour = colours.setdefault(item["label"], PALETTE[len(colours) % len(PALETTE)])
        x1, y1, x2, y2 = item["box"]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
        for label in (item["label"], item["label"].encode("ascii", "replace").decode()):
            try:
                left, top, right, bottom = draw.textbbox((x1, y1), label, font=font)
                lift = bottom - top + 2 * line
                origin = (x1, y1 - lift if y1 - lift >= 0 else y1)
                left, top, right, bottom = draw.textbbox((origin[0] + line, origin[1] + line), label, font=font)
                draw.rectangle([left - line, top - line, right + line, bottom + line], fill=colour)
                draw.text((origin[0] + line, origin[1] + line), label, fill=(255, 255, 255), font=font)
                break
            except (UnicodeError, OSError, ValueError):
                continue  # a bitmap font without these glyphs: try the ASCII spelling, else leave unlabelled
    return canvas


@dataclass
class Detection:
    boxes: list[dict]  # pixel boxes: {"label", "box": [x1, y1, x2, y2], "box_1000": [...]}
    answers: list[str]  # the raw answer per class
    parsed: bool  # every answer held a box list (possibly empty)
    width: int
    height: int
    image: Image.Image | None = None  # the upright image the boxes are in

    @property
    def raw(self) -> str:
        return "\n".join(self.answers)


def detection_conversations(classes: list[str], lang: str | None = None) -> list[list[dict]]:
    """One conversation per class, asked as grounding data asks; each holds one image part (the same picture)."""
    return [[{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": grounding_prompt([name], lang)}]}]
            for name in classes]


def collect_detection(classes: list[str], answers: list[str], width: int, height: int,
                      image: Image.Image | None = None) -> Detection:
    """The answers to `detection_conversations` → pixel boxes of a `width` × `height` image."""
    boxes, parsed = [], True
    for name, answer in zip(classes, answers, strict=True):
        found = parse_boxes(answer)
        parsed = parsed and found is not None
        for item in boxes_to_pixels(found or [], width, height):
            boxes.append(item | {"label": item["label"] or name})
    return Detection(boxes, list(answers), parsed, width, height, image)


def detect(model, processor, image: Image.Image, classes: list[str], lang: str | None = None,
           max_new_tokens: int = 512) -> Detection:
    """One question per class (as grounding data asks them), answered in one batch; boxes in the upright image's
    pixels (an image still carrying an EXIF orientation tag is turned first, as the loader turns every image)."""
    from vlmgraft.infer.generate import generate

    image = load_image(image)
    results = generate(model, processor, detection_conversations(classes, lang), [[image]] * len(classes),
                       max_new_tokens=max_new_tokens, enable_thinking=False)
    return collect_detection(classes, [r.text for r in results], *image.size, image=image)
