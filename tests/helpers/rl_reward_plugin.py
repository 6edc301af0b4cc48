"""User reward plugins for the GRPO tests: one with a spread (so advantages are non-zero), one that records its inputs."""

from __future__ import annotations

from vlmgraft.train.rl.rewards import completion_text

SEEN: list[dict] = []


def length_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    return [float(len(completion_text(c))) for c in completions]


def record_reward(prompts=None, completions=(), **kwargs) -> list[float]:
    SEEN.append({"prompts": prompts, "completions": completions, **kwargs})
    return [0.0] * len(completions)
