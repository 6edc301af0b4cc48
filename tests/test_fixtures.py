"""The fixture tokenizers cut text as the real Qwen3 and Llama 3 tokenizers do, where trainers depend on it."""

from __future__ import annotations

import pytest

from vlmgraft.fixtures.tokenizers import llama3_tokenizer, qwen3_tokenizer


@pytest.mark.parametrize("make", [qwen3_tokenizer, llama3_tokenizer])
@pytest.mark.parametrize("answer", ["红色", "red", "12", "圆形。"])
def test_a_chat_prompt_is_a_token_prefix_of_prompt_and_answer(make, answer):
    """TRL's SFT (1.16 on) tokenizes prompt + completion and trains on the prompt's tokens only as far as they are a
    prefix: a prompt ending in "\\n\\n" that merged differently with the answer would train on another context than
    the one inference renders (the demo's LLM then learned nothing it could use)."""
    tokenizer = make()
    messages = [{"role": "user", "content": "图中形状是什么颜色？"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joined = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    assert joined[: len(alone)] == alone


def test_newline_runs_stay_one_piece_and_qwen_digits_are_single():
    qwen, llama = qwen3_tokenizer(), llama3_tokenizer()
    assert qwen.tokenize("\n\nred") == ["ĊĊ", "red"]  # not "Ċ", "Ċ", as GPT-2's pattern cuts it
    assert qwen.tokenize("2024") == ["2", "0", "2", "4"]  # Qwen: one digit per token
    assert llama.tokenize("2024")[0] != "2"  # Llama 3: digits in groups of up to three
