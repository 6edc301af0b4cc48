"""The image tasks: VQA accuracy, grounding P/R/F1, caption BLEU/chrF, and the real-vs-noise vision ablation.

Each `evaluate_*` takes a model, its processor and `Sample`s, generates greedy answers (or reuses given ones) and
returns a dict of scores plus `records` (one per sample: question, prediction, reference, verdict) that the report
writer saves as JSON lines. `task_of` routes a mixed sample list: a reference holding `<box>` is grounding, a sample
whose source names captions or whose reference is longer than CAPTION_TOKENS tokens is captioning, the rest is VQA.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
from PIL import Image

from vlmgraft.data.sample import Sample
from vlmgraft.eval.boxes import grounding_scores
from vlmgraft.eval.generation import answer_samples, split_sample
from vlmgraft.eval.normalize import match_answer, normalize_tokens
from vlmgraft.grounding import OPEN, parse_boxes

CAPTION_TOKENS = 20
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


def task_of(sample: Sample) -> str:
    _, reference = split_sample(sample)
    if OPEN in reference:
        return "grounding"
    if "caption" in sample.source.lower() or len(normalize_tokens(reference)) > CAPTION_TOKENS:
        return "caption"
    return "vqa"


def question_of(sample: Sample) -> str:
    messages, _ = split_sample(sample)
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message["content"]
            return content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def _references(samples: list[Sample]) -> list[str]:
    return [split_sample(s)[1] for s in samples]


def evaluate_vqa(model, processor, samples: list[Sample], batch_size: int = 8, max_new_tokens: int = 64,
                 mode: str = "auto", predictions: list[str] | None = None) -> dict:
    """Accuracy by `match_answer` (mode: auto / choice / text), overall and per sample source."""
    if predictions is None:
        predictions = answer_samples(model, processor, samples, batch_size, max_new_tokens, desc="vqa")
    references = _references(samples)
    verdicts = [match_answer(p, r, mode) for p, r in zip(predictions, references, strict=True)]
    by_source: dict[str, list[bool]] = defaultdict(list)
    for sample, verdict in zip(samples, verdicts, strict=True):
        by_source[sample.source or "unnamed"].append(verdict is not None)
    correct = sum(v is not None for v in verdicts)
    return {
        "n": len(samples), "accuracy": correct / len(samples) if samples else 0.0, "correct": correct,
        "matched_by": dict(Counter(v for v in verdicts if v is not None)),
        "by_source": {name: sum(hits) / len(hits) for name, hits in sorted(by_source.items())},
        "records": [{"origin": s.origin, "question": question_of(s), "prediction": p, "reference": r, "match": v}
                    for s, p, r, v in zip(samples, predictions, references, verdicts, strict=True)],
    }


def evaluate_grounding(model, processor, samples: list[Sample], batch_size: int = 8, max_new_tokens: int = 128,
                       iou_threshold: float = 0.5, predictions: list[str] | None = None) -> dict:
    """Boxes parsed with `vlmgraft.grounding.parse_boxes`; samples whose reference has no box list are skipped."""
    references, usable, bad = [], [], []
    for sample, text in zip(samples, _references(samples), strict=True):
        boxes = parse_boxes(text)
        if boxes is None:
            bad.append(sample.origin or sample.source)
        else:
            references.append(boxes)
            usable.append(sample)
    if predictions is None:
        predictions = answer_samples(model, processor, usable, batch_size, max_new_tokens, desc="grounding")
    parsed = [parse_boxes(p) for p in predictions]
    scores = grounding_scores(parsed, references, iou_threshold)
    scores["skipped_bad_references"] = len(bad)
    scores["skipped_examples"] = bad[:10]
    scores["records"] = [{"origin": s.origin, "question": question_of(s), "prediction": p,
                          "reference": split_sample(s)[1], "parsed": b is not None}
                         for s, p, b in zip(usable, predictions, parsed, strict=True)]
    return scores


def evaluate_caption(model, processor, samples: list[Sample], batch_size: int = 8, max_new_tokens: int = 64,
                     predictions: list[str] | None = None) -> dict:
    """Corpus BLEU and chrF with sacrebleu; Chinese references switch BLEU to its `zh` tokeniser."""
    import sacrebleu

    if predictions is None:
        predictions = answer_samples(model, processor, samples, batch_size, max_new_tokens, desc="caption")
    references = _references(samples)
    tokenize = "zh" if any(_CJK.search(r) for r in references) else "13a"
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize) if samples else None
    chrf = sacrebleu.corpus_chrf(predictions, [references]) if samples else None
    return {
        "n": len(samples), "bleu": bleu.score if bleu else 0.0, "chrf": chrf.score if chrf else 0.0,
        "bleu_tokenize": tokenize, "bleu_signature": str(bleu) if bleu else "",
        "records": [{"origin": s.origin, "prediction": p, "reference": r}
                    for s, p, r in zip(samples, predictions, references, strict=True)],
    }


def noise_like(images: list[Image.Image], seed: int) -> list[Image.Image]:
    """Uniform RGB noise of the same sizes: same tiles and image tokens, no content."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(im.height, im.width, 3), dtype=np.uint8)) for im in images]


def evaluate_ablation(model, processor, samples: list[Sample], batch_size: int = 8, max_new_tokens: int = 64,
                      mode: str = "auto", seed: int = 0, real_predictions: list[str] | None = None) -> dict:
    """VQA accuracy with the real images vs. noise images; a gap near 0 means the answers ignore the image."""
    with_images = [i for i, s in enumerate(samples) if s.images]
    chosen = [samples[i] for i in with_images]
    if real_predictions is None:
        real_predictions = answer_samples(model, processor, chosen, batch_size, max_new_tokens, desc="ablation real")
    else:
        real_predictions = [real_predictions[i] for i in with_images]
    noise = [noise_like(s.images, seed + i) for i, s in enumerate(chosen)]
    noise_predictions = answer_samples(model, processor, chosen, batch_size, max_new_tokens, desc="ablation noise",
                                       images=noise)
    real = evaluate_vqa(None, None, chosen, mode=mode, predictions=real_predictions)
    fake = evaluate_vqa(None, None, chosen, mode=mode, predictions=noise_predictions)
    changed = sum(a != b for a, b in zip(real_predictions, noise_predictions, strict=True))
    return {
        "n": len(chosen), "accuracy_real": real["accuracy"], "accuracy_noise": fake["accuracy"],
        "gap": real["accuracy"] - fake["accuracy"], "answers_changed": changed / len(chosen) if chosen else 0.0,
        "records": [{"origin": s.origin, "question": question_of(s), "real": a, "noise": b,
                     "reference": split_sample(s)[1]}
                    for s, a, b in zip(chosen, real_predictions, noise_predictions, strict=True)],
    }
