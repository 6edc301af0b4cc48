"""VQA answer matching for Chinese and English: normalisation, the exact and leading-phrase rules, choice letters.

The rules, in order (both prediction and reference go through the same steps):
1. Unicode NFKC, so full-width letters, digits and punctuation become half-width (`，` → `,`, `１` → `1`); lowercase.
2. Chinese numerals become digits (`两` → 2, `十二` → 12, `一百零五` → 105, digit strings like `二〇二四` → 2024).
3. Punctuation (any Unicode P* character, so `。、「」` too) becomes a space.
4. Tokens: each CJK character is one token, other text splits on whitespace; English number words zero–twenty
   become digits and the articles a/an/the are dropped.
5. Exact match: the token strings are equal once joined without spaces (so `ice cream` = `icecream`).
6. Leading phrase: the reference's tokens are the first tokens of a short prediction (≤ SHORT_ANSWER_TOKENS tokens),
   so `红色的` matches `红色` and `2 dogs` matches `two`, but `10` does not match `1` (tokens are whole words/numbers).
Multiple choice: `choice_letter` pulls A–H out of "B", "(B)", "B. red", "答案是B", "The answer is (b)".
"""

from __future__ import annotations

import re
import unicodedata

SHORT_ANSWER_TOKENS = 10
_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "兩": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7,
              "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000}
_CN_BIG_UNITS = {"万": 10_000, "萬": 10_000, "亿": 100_000_000}
_CN_NUMBER = re.compile("[" + "".join(_CN_DIGITS) + "".join(_CN_UNITS) + "".join(_CN_BIG_UNITS) + "]+")
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_EN_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_LETTERS = "ABCDEFGH"
_LEADING_LETTER = re.compile(rf"^\s*[(\[]?\s*([{_LETTERS}])\s*(?:[)\].:、:)\s]|$)")
_ANSWER_IS = re.compile(rf"(?:答案|选项|正确选项|选择|选|answer|option)\s*(?:是|为|应该是|应为|is|:)?\s*[(\[]?\s*"
                        rf"([{_LETTERS}{_LETTERS.lower()}])(?![A-Za-z])", re.IGNORECASE)
_LONE_LETTER = re.compile(rf"(?<![A-Za-z])([{_LETTERS}])(?![A-Za-z])")


def chinese_number(run: str) -> int:
    """Value of a run of Chinese numeral characters; without any unit it is read digit by digit (二〇二四)."""
    if not any(ch in _CN_UNITS or ch in _CN_BIG_UNITS for ch in run):
        return int("".join(str(_CN_DIGITS[ch]) for ch in run))
    total = section = digit = 0
    for ch in run:
        if ch in _CN_DIGITS:
            digit = _CN_DIGITS[ch]
        elif ch in _CN_UNITS:
            section += (digit or 1) * _CN_UNITS[ch]  # 十二: a unit with no digit before it means one of it
            digit = 0
        else:
            total += (section + digit) * _CN_BIG_UNITS[ch]
            section = digit = 0
    return total + section + digit


def normalize_tokens(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    text = _CN_NUMBER.sub(lambda m: f" {chinese_number(m.group(0))} ", text)
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    tokens = [_EN_NUMBERS.get(t, t) for t in _TOKEN.findall(text)]
    return [t for t in tokens if t not in _ARTICLES]


def normalize_answer(text: str) -> str:
    """The canonical string two answers are compared by (tokens joined without spaces)."""
    return "".join(normalize_tokens(text))


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter an answer gives, or None when it names none."""
    text = unicodedata.normalize("NFKC", text).strip()
    for pattern in (_LEADING_LETTER, _ANSWER_IS):
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    lone = set(_LONE_LETTER.findall(text))
    return lone.pop() if len(lone) == 1 else None


def is_choice_reference(reference: str) -> bool:
    """A reference that is just a letter (B, (B), B., b) marks a multiple-choice question."""
    return bool(re.fullmatch(rf"\s*[(\[]?\s*[{_LETTERS}]\s*[)\].]?\s*", unicodedata.normalize("NFKC", reference),
                             re.IGNORECASE))


def match_answer(prediction: str, reference: str, mode: str = "auto") -> str | None:
    """How the prediction matches the reference: "choice", "exact", "leading", or None for a miss.

    mode: "auto" (choice matching when the reference is a bare letter), "choice" (always) or "text" (never).
    """
    if mode == "choice" or (mode == "auto" and is_choice_reference(reference)):
        predicted = choice_letter(prediction)
        return "choice" if predicted is not None and predicted == choice_letter(reference.upper()) else None
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    if not ref:
        return "exact" if not pred else None
    if "".join(pred) == "".join(ref):
        return "exact"
    if len(pred) <= SHORT_ANSWER_TOKENS and pred[:len(ref)] == ref:
        return "leading"
    return None
