"""Prompt wording for detection-derived tasks (detect a class, caption) in zh and en, and class-name synonyms.

Both tables are plain data written for this project and can be extended from a YAML/JSON file:

    prompts:                     # extra templates, added to the built-in ones ({label} is the class name)
      detect: {zh: ["把图里的{label}都框出来。"], en: ["Box every {label}."]}
      caption: {en: ["Say what you see."]}
    replace_prompts: false       # true: use only the file's templates for the tasks it lists
    synonyms:                    # category name → names per language (first one is the default)
      person: {zh: [人, 行人], en: [person, pedestrian]}

A detection answer is always `vlmgraft.grounding.format_boxes(...)`; a class that is absent is answered with the
empty list `<box>[]</box>` and nothing else, so an evaluator parses every answer the same way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlmgraft.errors import VlmgraftError

LANGS = ("zh", "en")

PROMPTS: dict[str, dict[str, list[str]]] = {
    "detect": {
        "zh": ["找出图中所有的{label}，给出它们的坐标框。", "图里的{label}在哪里？请用方框标出来。",
               "请检测这张图片中的{label}。", "标出图像里每一个{label}的位置。", "这张图中有{label}吗？有的话请框出来。"],
        "en": ["Find every {label} in the image and give its box.", "Where is the {label} in this picture? Answer "
               "with boxes.", "Detect each {label} in the image.", "Mark the position of every {label} you can see.",
               "Is there a {label} here? If so, box it."],
    },
    "caption": {
        "zh": ["请描述这张图片。", "用一句话说说图里有什么。", "这张图片的内容是什么？", "简单描述一下这幅图像。"],
        "en": ["Describe this image.", "Write a one-sentence caption for the picture.", "What does this image show?",
               "Give a short description of the image."],
    },
}

# COCO's 80 categories (Objects365 shares most of them) and the shapes world's kinds, in Chinese.
ZH_NAMES = dict(zip(
    ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
     "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
     "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
     "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
     "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
     "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
     "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
     "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
     "circle", "square", "triangle", "star"],
    ["人", "自行车", "汽车", "摩托车", "飞机", "公交车", "火车", "卡车", "船", "红绿灯", "消防栓", "停车标志", "停车计时器",
     "长椅", "鸟", "猫", "狗", "马", "羊", "牛", "大象", "熊", "斑马", "长颈鹿", "背包", "雨伞", "手提包", "领带", "行李箱",
     "飞盘", "滑雪板", "单板滑雪板", "球", "风筝", "棒球棒", "棒球手套", "滑板", "冲浪板", "网球拍", "瓶子", "酒杯", "杯子",
     "叉子", "刀", "勺子", "碗", "香蕉", "苹果", "三明治", "橙子", "西兰花", "胡萝卜", "热狗", "披萨", "甜甜圈", "蛋糕", "椅子",
     "沙发", "盆栽", "床", "餐桌", "马桶", "电视", "笔记本电脑", "鼠标", "遥控器", "键盘", "手机", "微波炉", "烤箱",
     "烤面包机", "水槽", "冰箱", "书", "时钟", "花瓶", "剪刀", "泰迪熊", "吹风机", "牙刷",
     "圆形", "正方形", "三角形", "星形"], strict=True))

EXTRA_SYNONYMS = {
    "person": {"zh": ["人", "行人"], "en": ["person", "pedestrian"]},
    "tv": {"zh": ["电视", "电视机"], "en": ["tv", "television"]},
    "couch": {"zh": ["沙发"], "en": ["couch", "sofa"]},
    "cell phone": {"zh": ["手机"], "en": ["cell phone", "mobile phone"]},
}


class PromptBook:
    """Templates per task and language, plus class names per language; every choice comes from the caller's rng."""

    def __init__(self, extra: str | Path | dict | None = None):
        self.prompts = {task: {lang: list(texts) for lang, texts in by_lang.items()}
                        for task, by_lang in PROMPTS.items()}
        self.synonyms = {name: {"zh": [zh], "en": [name]} for name, zh in ZH_NAMES.items()}
        for name, by_lang in EXTRA_SYNONYMS.items():
            self.synonyms[name] = {lang: list(v) for lang, v in by_lang.items()}
        if extra is not None:
            self._extend(_read_table(extra) if not isinstance(extra, dict) else extra, str(extra)[:80])

    def _extend(self, table: dict, where: str) -> None:
        replace = bool(table.get("replace_prompts", False))
        for task, by_lang in (table.get("prompts") or {}).items():
            for lang, texts in by_lang.items():
                if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                    raise VlmgraftError(f"{where}: prompts.{task}.{lang} must be a list of strings")
                if task == "detect" and not all("{label}" in t for t in texts):
                    raise VlmgraftError(f"{where}: every prompts.detect template needs a {{label}} slot")
                known = self.prompts.setdefault(task, {}).setdefault(lang, [])
                self.prompts[task][lang] = list(texts) if replace else known + list(texts)
        for name, by_lang in (table.get("synonyms") or {}).items():
            if not isinstance(by_lang, dict):
                raise VlmgraftError(f"{where}: synonyms.{name} must map languages to lists of names")
            entry = self.synonyms.setdefault(str(name), {"zh": [str(name)], "en": [str(name)]})
            for lang, names in by_lang.items():
                entry[lang] = [names] if isinstance(names, str) else [str(n) for n in names]

    def prompt(self, task: str, lang: str, rng: random.Random, **slots) -> str:
        templates = self.prompts.get(task, {}).get(lang)
        if not templates:
            raise VlmgraftError(f"no {lang!r} prompt templates for task {task!r}")
        return rng.choice(templates).format(**slots)

    def has_name(self, category: str, lang: str) -> bool:
        """Whether the tables give `category` a name in `lang` (else `label` falls back to the category's own)."""
        return bool(self.synonyms.get(category, {}).get(lang) or self.synonyms.get(category.lower(), {}).get(lang))

    def label(self, category: str, lang: str, rng: random.Random) -> str:
        """A name for the category in `lang`: a random synonym, or the category's own name when none is known."""
        names = self.synonyms.get(category, {}).get(lang) or self.synonyms.get(category.lower(), {}).get(lang)
        return rng.choice(names) if names else category


def _read_table(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise VlmgraftError(f"cannot read prompt file {path}: {err}") from err
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            table = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise VlmgraftError(f"{path} is not valid YAML: {err}") from err
    else:
        try:
            table = json.loads(text)
        except json.JSONDecodeError as err:
            raise VlmgraftError(f"{path} is not valid JSON: line {err.lineno}: {err.msg}") from err
    if not isinstance(table, dict):
        raise VlmgraftError(f"{path} must hold a mapping with 'prompts' and/or 'synonyms'")
    return table
