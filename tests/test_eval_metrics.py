"""Evaluation metrics without a model: answer matching (zh/en, letters), grounding scores, BLEU/chrF, report files."""

from __future__ import annotations

import json

import pytest

from vlmgraft.data.sample import Sample
from vlmgraft.eval.boxes import grounding_scores, match_boxes
from vlmgraft.eval.normalize import chinese_number, choice_letter, match_answer, normalize_answer
from vlmgraft.eval.report import write_report
from vlmgraft.eval.tasks import evaluate_caption, evaluate_grounding, evaluate_vqa, task_of
from vlmgraft.grounding import Box, format_boxes


@pytest.mark.parametrize("text,value", [("两", 2), ("十", 10), ("十二", 12), ("二十三", 23), ("一百零五", 105),
                                        ("两千", 2000), ("三万五千", 35000), ("二〇二四", 2024)])
def test_chinese_numerals(text, value):
    assert chinese_number(text) == value


@pytest.mark.parametrize("prediction,reference,verdict", [
    ("两只", "2", "leading"),            # numeral + measure word
    ("二十三", "23", "exact"),
    ("三十", "3", None),                 # 30 is not 3
    ("10 apples", "1", None),            # whole numbers only
    ("ＨＥＬＬＯ，世界！", "hello 世界", "exact"),  # full-width letters and punctuation
    ("红色。", "红色", "exact"),
    ("红色的", "红色", "leading"),
    ("Two dogs.", "2", "leading"),
    ("a dog", "dog", "exact"),           # articles dropped
    ("ice cream", "icecream", "exact"),  # whitespace ignored
    ("是的，图中有两只狗", "是", "leading"),
    ("我认为图中一共有两只非常可爱的小狗在玩耍", "我", None),  # too long to count as a short answer
    ("蓝色", "红色", None),
    ("(B)", "B", "choice"),
    ("答案是B", "B", "choice"),
    ("B. red", "b", "choice"),
    ("The answer is (c)", "C", "choice"),
    ("A", "B", None),
])
def test_answer_matching(prediction, reference, verdict):
    assert match_answer(prediction, reference) == verdict


def test_choice_letter_extraction_and_modes():
    assert [choice_letter(t) for t in ["B", "（Ｄ）", "选项：C", "I think C is right", "B) blue", "none of them"]] \
        == ["B", "D", "C", "C", "B", None]
    assert match_answer("B", "B", mode="text") == "exact"
    assert match_answer("blue, so B", "B", mode="choice") == "choice"
    assert normalize_answer("Ｔｈｅ  二 dogs！") == "2dogs"


def _sample(reference: str, source: str = "set", question: str = "q") -> Sample:
    return Sample(messages=[{"role": "user", "content": [{"type": "text", "text": question}]},
                            {"role": "assistant", "content": reference}], source=source, origin=f"{source}:1")


def test_vqa_scores_from_given_predictions():
    samples = [_sample("两只", "zh"), _sample("B", "mc"), _sample("red", "en"), _sample("blue", "en")]
    result = evaluate_vqa(None, None, samples, predictions=["2只狗", "答案是B", "Red.", "green"])
    assert result["accuracy"] == 0.75 and result["correct"] == 3
    assert result["matched_by"] == {"leading": 1, "choice": 1, "exact": 1}
    assert result["by_source"] == {"en": 0.5, "mc": 1.0, "zh": 1.0}


def test_grounding_greedy_matching_by_hand():
    dog, cat = Box("狗", 0, 0, 100, 100), Box("猫", 200, 200, 400, 400)
    predicted = [Box("狗", 0, 0, 100, 50),      # IoU 0.5 with dog, listed first but weaker
                 Box("狗", 0, 0, 100, 100),     # IoU 1.0: greedy takes this pair first
                 Box("猫", 300, 200, 400, 400),  # IoU 20000/40000 = 0.5 with cat: counts (≥ 0.5)
                 Box("狗", 200, 200, 400, 400)]  # right place, wrong label: no match
    one = match_boxes(predicted, [dog, cat])
    assert one.true_positives == 2 and one.matched_ious == [1.0, 0.5]
    scores = grounding_scores([predicted, None, []], [[dog, cat], [Box("狗", 0, 0, 200, 200)], []])
    assert scores["true_positives"] == 2 and scores["predicted_boxes"] == 4 and scores["reference_boxes"] == 3
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert scores["mean_iou_of_matches"] == pytest.approx(0.75)
    assert scores["unparseable"] == 1 and scores["unparseable_rate"] == pytest.approx(1 / 3)


def test_grounding_from_answer_text_counts_unparseable_and_bad_references():
    reference = format_boxes([{"label": "dog", "box": [100, 100, 500, 500]}])
    samples = [_sample(reference), _sample(reference), _sample("no boxes here")]
    truncated = '<box>[{"label": "dog", "box": [100, 100, 500, 500]}, {"label": "dog", "box": [6'
    result = evaluate_grounding(None, None, samples[:2] + samples[2:], predictions=[truncated, "I see a dog"])
    assert result["skipped_bad_references"] == 1 and result["images"] == 2
    assert result["true_positives"] == 1 and result["unparseable"] == 1
    assert result["precision"] == 1.0 and result["recall"] == 0.5
    assert [task_of(s) for s in samples] == ["grounding", "grounding", "vqa"]


def test_caption_bleu_uses_chinese_tokenisation():
    refs = ["一只黑色的猫坐在红色的沙发上", "两个孩子在公园里放风筝"]
    perfect = evaluate_caption(None, None, [_sample(r, "caption") for r in refs], predictions=refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["bleu_tokenize"] == "zh"
    close = evaluate_caption(None, None, [_sample(r, "caption") for r in refs],
                             predictions=["一只黑色的猫坐在沙发上", "孩子们在公园放风筝"])
    # Without the zh tokeniser each unspaced sentence is one "word" and BLEU would be 0.
    assert 0 < close["bleu"] < 100 and 0 < close["chrf"] < 100
    assert task_of(_sample(refs[0], "coco-caption")) == "caption"


def test_report_files(tmp_path):
    samples = [_sample("red", "en"), _sample("blue", "zh")]
    results = {"vqa": evaluate_vqa(None, None, samples, predictions=["red", "no"]),
               "grounding": grounding_scores([[Box("a", 0, 0, 10, 10)]], [[Box("a", 0, 0, 10, 20)]]),
               "caption": {"skipped": "no caption samples"}}
    results["grounding"]["records"] = []
    slim = write_report(results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == slim and list(saved) == ["vqa", "grounding", "caption"]
    assert "records" not in saved["vqa"] and saved["vqa"]["accuracy"] == 0.5
    table = (tmp_path / "results.md").read_text()
    assert "| vqa | 2 | accuracy | 0.5 |" in table and "| caption | 0 | skipped |" in table
    for png in ("vqa.png", "grounding.png", "grounding_iou_hist.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in lines] == ["red", "no"]
