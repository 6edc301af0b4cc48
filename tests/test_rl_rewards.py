"""GRPO reward functions: the cases users rely on, with hand-computed expected values."""

from __future__ import annotations

import sys
import types

import pytest

from vlmgraft.errors import VlmgraftError
from vlmgraft.train.rl.rewards import (
    accuracy_reward,
    box_iou_score,
    format_reward,
    iou_reward,
    resolve_rewards,
    well_formed,
)


def boxes(*items):
    import json
    return "<box>" + json.dumps([{"label": label, "box": list(box)} for label, box in items]) + "</box>"


def test_iou_perfect_disjoint_and_partial():
    ref = boxes(("cat", (0, 0, 100, 100)))
    assert box_iou_score(ref, ref) == 1.0
    assert box_iou_score(boxes(("cat", (200, 200, 300, 300))), ref) == 0.0
    # overlap 50x100 = 5000, union 10000 + 10000 - 5000 = 15000
    assert box_iou_score(boxes(("cat", (50, 0, 150, 100))), ref) == pytest.approx(1 / 3)


def test_iou_label_mismatch_scores_zero():
    assert box_iou_score(boxes(("dog", (0, 0, 100, 100))), boxes(("cat", (0, 0, 100, 100)))) == 0.0


def test_iou_extra_and_missing_boxes_cost():
    ref = boxes(("cat", (0, 0, 100, 100)), ("dog", (500, 500, 600, 600)))
    assert box_iou_score(boxes(("cat", (0, 0, 100, 100))), ref) == 0.5  # one of two found
    extra = boxes(("cat", (0, 0, 100, 100)), ("dog", (500, 500, 600, 600)), ("dog", (0, 900, 10, 1000)),
                  ("cat", (900, 0, 1000, 10)))
    assert box_iou_score(extra, ref) == 0.5  # two right out of four said


def test_iou_empty_vs_empty_and_no_ground_truth():
    assert box_iou_score("<box>[]</box>", "<box>[]</box>") == 1.0
    assert box_iou_score(boxes(("cat", (0, 0, 9, 9))), "<box>[]</box>") == 0.0
    assert box_iou_score("no boxes at all", boxes(("cat", (0, 0, 9, 9)))) == 0.0
    assert iou_reward(completions=["<box>[]</box>", "x"], solution=[None, "a red circle"]) == [None, None]


def test_rewards_take_message_list_completions_and_think_blocks():
    completions = [[{"role": "assistant", "content": "<think>it is red</think>\n\n红色"}],
                   [{"role": "assistant", "content": [{"type": "text", "text": "<answer>蓝色</answer>"}]}],
                   "绿色的"]
    assert accuracy_reward(prompts=[[]] * 3, completions=completions, solution=["红色", "红色", "绿色"]) == [
        1.0, 0.0, 1.0]
    assert accuracy_reward(completions=["B. red"], answer=["B"]) == [1.0]


def test_format_rule():
    assert well_formed("<think>ok</think><answer>红色</answer>")
    assert well_formed("红色")
    assert not well_formed("<think>never closed 红色")
    assert not well_formed("红色 <think>late</think>")
    assert not well_formed("<answer>a</answer><answer>b</answer>")
    assert well_formed('<box>[{"label": "cat", "box": [1, 2, 3, 4]}]</box>', expects_boxes=True)
    assert not well_formed('<box>[{"label": "cat", "box": [1, 2, 3]}]</box>')
    assert not well_formed('<box>[{"label": "cat", "box": [5, 2, 3, 4]}]</box>')
    assert not well_formed("a cat", expects_boxes=True)
    ref = boxes(("cat", (0, 0, 1, 1)))
    assert format_reward(completions=["a cat", ref], solution=[ref, ref]) == [0.0, 1.0]


def test_resolve_builtins_soft_overlong_and_user_functions(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.length = lambda prompts, completions, **kw: [float(len(c)) for c in completions]
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    funcs = resolve_rewards(["accuracy", "format", "iou", "soft_overlong", "my_rewards:length"],
                            max_completion_length=8)
    assert [f.__name__ for f in funcs[:3]] == ["accuracy_reward", "format_reward", "iou_reward"]
    assert funcs[3](completions=["a", "b"], completion_ids=[[1] * 4, [1] * 9]) == [0.0, -1.0]
    assert funcs[4](prompts=None, completions=["abc"]) == [3.0]
    with pytest.raises(VlmgraftError, match="unknown reward 'acc'"):
        resolve_rewards(["acc"])
    with pytest.raises(VlmgraftError, match="cannot import 'nope_mod:f'"):
        resolve_rewards(["nope_mod:f"])
