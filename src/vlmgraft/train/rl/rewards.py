"""Reward functions for GRPO/CHORD rollouts, in TRL's reward signature, plus the lookup that turns config names into them.

TRL calls each function as `f(prompts=..., completions=..., completion_ids=..., **columns)`, where every extra dataset
column (`solution`, `answer`, ...) arrives as a list aligned with the completions, and logs each function under its
`__name__`. Completions are strings, or message lists for conversational prompts; both are accepted. A reward of None
means "does not apply to this row" (TRL turns it into NaN and leaves it out of the mean).

Built in:
- `accuracy`: the answer matches the row's reference under `vlmgraft eval`'s VQA matching (choice letters, Chinese
  numerals, leading phrase);
- `format`: a well-formed `<think>…</think>` block (if any) before the answer, well-formed `<answer>` tags (if any),
  and, where the answer or the reference holds `<box>`, strict box JSON;
- `iou`: boxes matched one-to-one per label, the sum of matched IoUs over the larger of the two counts (so extra or
  missing boxes cost), 1.0 when both lists are empty, None when the row has no box reference;
- `soft_overlong`: DAPO's length penalty, TRL's own implementation.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence

from vlmgraft.errors import VlmgraftError
from vlmgraft.eval.boxes import match_boxes
from vlmgraft.eval.normalize import match_answer
from vlmgraft.grounding import CLOSE, OPEN, SCALE, parse_boxes

REFERENCE_COLUMNS = ("solution", "answer", "reference", "ground_truth")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion) -> str:
    """The assistant text of a completion given as a string, a message dict or a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion or []:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list):  # multimodal content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(str(content or ""))
    return "".join(parts)


def final_answer(text: str) -> str:
    """What the model answered: inside `<answer>` tags when present, else the text after any think block."""
    tagged = _ANSWER.search(text)
    if tagged:
        return tagged.group(1).strip()
    closed = text.rfind("</think>")
    return (text[closed + len("</think>"):] if closed >= 0 else text).strip()


def _references(kwargs: dict, count: int) -> list[str | None]:
    for column in REFERENCE_COLUMNS:
        values = kwargs.get(column)
        if values is not None:
            return [None if v is None else completion_text(v) for v in values]
    return [None] * count


def accuracy_reward(prompts=None, completions=(), **kwargs) -> list[float | None]:
    """1.0 when the answer matches the row's reference as `vlmgraft eval` matches VQA answers, else 0.0."""
    references = _references(kwargs, len(completions))
    return [None if ref is None else float(match_answer(final_answer(completion_text(c)), ref) is not None)
            for c, ref in zip(completions, references, strict=True)]


def _strict_boxes(body: str) -> bool:
    """Whether a `<box>` body is exactly a JSON list of {"label": str, "box": [x1, y1, x2, y2]} within 0–1000."""
    try:
        items = json.loads(body)
    except json.JSONDecodeError:
        return False
    if not isinstance(items, list):
        return False
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("label"), str):
            return False
        box = item.get("box")
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            return False
        x1, y1, x2, y2 = box
        if not (0 <= x1 <= x2 <= SCALE and 0 <= y1 <= y2 <= SCALE):
            return False
    return True


def well_formed(text: str, expects_boxes: bool = False) -> bool:
    """The `format` reward's rule for one completion (see the module docstring)."""
    stripped = text.strip()
    if "<think>" in stripped or "</think>" in stripped:
        if stripped.count("<think>") != 1 or stripped.count("</think>") != 1 or not stripped.startswith("<think>"):
            return False
        stripped = stripped[stripped.index("</think>") + len("</think>"):].strip()
    if "<answer>" in stripped or "</answer>" in stripped:
        tagged = _ANSWER.fullmatch(stripped)
        if tagged is None or stripped.count("<answer>") != 1:
            return False
        stripped = tagged.group(1).strip()
    if not stripped:
        return False
    if expects_boxes or OPEN in stripped:
        start, end = stripped.find(OPEN), stripped.find(CLOSE)
        if start < 0 or end < start or stripped.count(OPEN) != 1:
            return False
        return _strict_boxes(stripped[start + len(OPEN):end])
    return True


def format_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    """1.0 for a well-formed completion, else 0.0; rows whose reference holds boxes must answer with strict boxes."""
    references = _references(kwargs, len(completions))
    return [float(well_formed(completion_text(c), expects_boxes=ref is not None and OPEN in ref))
            for c, ref in zip(completions, references, strict=True)]


def box_iou_score(predicted_text: str, reference_text: str) -> float | None:
    """Mean-IoU-with-count-penalty of one answer against one reference (None: the reference holds no box list)."""
    reference = parse_boxes(reference_text) if OPEN in reference_text else None
    if reference is None:
        return None
    predicted = parse_boxes(final_answer(predicted_text))
    if predicted is None:
        return 0.0
    if not predicted and not reference:
        return 1.0
    matched = match_boxes(predicted, reference, threshold=0.0).matched_ious
    return sum(matched) / max(len(predicted), len(reference))


def iou_reward(prompts=None, completions=(), **kwargs) -> list[float | None]:
    """Box IoU against the row's reference boxes (see `box_iou_score`); None for rows without one."""
    references = _references(kwargs, len(completions))
    return [None if ref is None else box_iou_score(completion_text(c), ref)
            for c, ref in zip(completions, references, strict=True)]


def soft_overlong(max_completion_length: int, buffer: int | None = None) -> Callable:
    """DAPO's soft overlong penalty over the last `buffer` tokens (a quarter of the budget by default)."""
    from trl.rewards import get_soft_overlong_punishment

    punish = get_soft_overlong_punishment(max_completion_length, buffer if buffer is not None
                                          else max(1, max_completion_length // 4))

    def soft_overlong_reward(prompts=None, completions=(), completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise VlmgraftError("the soft_overlong reward needs completion_ids (TRL's GRPOTrainer passes them)")
        return punish(completion_ids)

    return soft_overlong_reward


BUILT_IN = {"accuracy": accuracy_reward, "format": format_reward, "iou": iou_reward}


def resolve_rewards(names: Sequence[str], max_completion_length: int = 256) -> list[Callable]:
    """Config names → reward functions: built-ins by name, a user's own as `module:function` (or `module.function`)."""
    if not names:
        raise VlmgraftError("grpo.rewards is empty: name at least one reward (accuracy, format, iou, soft_overlong, "
                            "or your own as module:function)")
    resolved = []
    for name in names:
        if name in BUILT_IN:
            resolved.append(BUILT_IN[name])
        elif name == "soft_overlong":
            resolved.append(soft_overlong(max_completion_length))
        elif ":" in name or "." in name:
            module_name, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
            try:
                function = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise VlmgraftError(f"grpo.rewards: cannot import {name!r} ({err}); write it as module:function with "
                                    f"the module on PYTHONPATH") from err
            if not callable(function):
                raise VlmgraftError(f"grpo.rewards: {name!r} is not callable")
            resolved.append(function)
        else:
            raise VlmgraftError(f"grpo.rewards: unknown reward {name!r}; built in: {', '.join(BUILT_IN)}, "
                                f"soft_overlong; or your own as module:function")
    return resolved
