"""Text-only parity with the base LLM: does the graft still answer text prompts exactly as the LLM it came from?

While the LLM is frozen (graft, align stage) the greedy answers must be identical and the first-step logits equal up
to float noise; after LoRA/full training the share of changed answers measures how far the language side moved.
Prompts render through each side's own chat template (the graft's renders text-only chats byte-identically).
"""

from __future__ import annotations

import torch

from vlmgraft.eval.generation import first_step_logits, generate_tokens, render_prompt

PARITY_PROMPTS = (
    "用一句话介绍你自己。",
    "中国的首都是哪里？",
    "3 加 5 等于几？",
    "把“早上好”翻译成英文。",
    "列出三种常见的水果。",
    "写一句关于秋天的诗。",
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 3?",
    "Translate 'thank you' into Chinese.",
    "Write one sentence about the sea.",
    "Is a tomato a fruit or a vegetable? Answer briefly.",
)


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def evaluate_parity(model, processor, llm, tokenizer, prompts=PARITY_PROMPTS, batch_size: int = 8,
                    max_new_tokens: int = 32) -> dict:
    """Greedy answers and next-token logits of the graft (`model`, `processor`) vs. the LLM (`llm`, `tokenizer`).

    prompts: strings (one user turn each) or full message lists.
    """
    conversations = [_as_messages(p) for p in prompts]
    if tokenizer.pad_token is None:  # batching needs one; padding is masked, so eos is safe
        tokenizer.pad_token = tokenizer.eos_token
    # Token ids, not text: a random or undertrained model's answers may decode to whitespace on both sides.
    graft_answers = generate_tokens(model, processor, conversations, None, batch_size, max_new_tokens,
                                    desc="parity graft")
    llm_answers = generate_tokens(llm, tokenizer, conversations, None, batch_size, max_new_tokens,
                                  desc="parity LLM")
    graft_logits = first_step_logits(model, processor, conversations)
    llm_logits = first_step_logits(llm, tokenizer, conversations)
    diffs = []
    for a, b in zip(graft_logits, llm_logits, strict=True):
        shared = min(a.shape[-1], b.shape[-1])  # the graft may have added rows for vision tokens
        diffs.append(float((a[:shared] - b[:shared]).abs().max()))
    same_tokens = [processor.tokenizer(render_prompt(processor, c), add_special_tokens=False).input_ids
                   == tokenizer(render_prompt(tokenizer, c), add_special_tokens=False).input_ids
                   for c in conversations]
    identical = [a == b for a, b in zip(graft_answers, llm_answers, strict=True)]
    return {
        "n": len(conversations), "identical_answers": sum(identical) / len(identical) if identical else 0.0,
        "changed_share": 1 - sum(identical) / len(identical) if identical else 0.0,
        "max_abs_logit_diff": max(diffs, default=0.0), "same_prompt_tokens": all(same_tokens),
        "records": [{"prompt": c[-1]["content"], "graft": tokenizer.decode(a), "llm": tokenizer.decode(b),
                     "identical": same, "max_abs_logit_diff": d}
                    for c, a, b, same, d in zip(conversations, graft_answers, llm_answers, identical, diffs,
                                                strict=True)],
    }


def load_llm_like(llm: str, stored_dtype: torch.dtype, compute_dtype: torch.dtype, device="cpu"):
    """The base LLM and its tokenizer, its weights rounded to the dtype the graft stores them in.

    A graft saved in bf16 from an fp32 LLM holds bf16-rounded weights; comparing against the unrounded LLM would
    report differences the graft did not cause.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlmgraft import hub

    base = hub.load_model(AutoModelForCausalLM.from_pretrained, llm, "base LLM", dtype=stored_dtype)
    tokenizer = hub.load(AutoTokenizer.from_pretrained, llm, "base LLM tokenizer")
    return base.to(compute_dtype).to(device).eval(), tokenizer
