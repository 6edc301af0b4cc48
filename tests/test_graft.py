"""The graft core: stock loading, tying, tokens, template surgery, overwrite guard, offline errors."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.build import BuildOptions, build, guard_output

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "red?"},
     {"role": "assistant", "content": "yes", "reasoning_content": "the shape is red"},
     {"role": "user", "content": "and blue?"}],
    [{"role": "user", "content": "北京天气?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
         "name": "get_weather", "arguments": {"city": "北京"}}}]},
     {"role": "tool", "content": "晴"}],
]


@pytest.mark.parametrize("llm", ["qwen3", "qwen3-untied", "llama3"])
def test_build_loads_with_stock_transformers_and_keeps_llm_class_and_tying(tiny_dir, tmp_path, llm):
    out = tmp_path / "graft"
    report = build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / llm), out=out), log=lambda *_: None)
    assert report.passed
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / llm)
    assert type(model).__name__ == "SmolVLMForConditionalGeneration"
    assert type(model.model.text_model) is type(base.model)
    assert model.dtype == torch.bfloat16
    tied = base.config.tie_word_embeddings
    assert model.config.tie_word_embeddings == tied
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    if not tied:  # an untied head is the LLM's own head, not a copy of the embeddings
        n = len(AutoTokenizer.from_pretrained(tiny_dir / llm))
        assert torch.equal(model.lm_head.weight[:n].float(), base.lm_head.weight[:n].to(torch.bfloat16).float())
    assert model.generation_config.eos_token_id == base.generation_config.eos_token_id
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert model.config.image_token_id == model.model.config.image_token_id == image_id
    saved = json.loads((out / "graft_report.json").read_text())
    assert saved["audit"]["passed"] and len(saved["audit"]["checks"]) == 10


def test_qwen_vision_tokens_are_reused_and_llama_gets_new_rows(tiny_dir, tiny_graft, tmp_path):
    qwen = json.loads((tiny_graft / "graft_report.json").read_text())
    assert qwen["tokens"]["image_token"] == "<|image_pad|>" and qwen["added_token_ids"] == []
    assert qwen["tokens"]["fake_image_token"] == "<|vision_start|>"
    tok = AutoTokenizer.from_pretrained(tiny_graft)
    assert len(tok) == len(AutoTokenizer.from_pretrained(tiny_dir / "qwen3"))
    assert tok.image_token == "<|image_pad|>" and tok.global_image_token == "<|vision_pad|>"

    out = tmp_path / "llama-graft"
    build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "llama3"), out=out), log=lambda *_: None)
    report = json.loads((out / "graft_report.json").read_text())
    added = report["added_token_ids"]
    assert report["tokens"]["image_token"] == "<image>" and len(added) >= 3
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "llama3", dtype=torch.float32)
    rows = model.get_input_embeddings().weight
    expected_mean = base.get_input_embeddings().weight[: len(AutoTokenizer.from_pretrained(tiny_dir / "llama3"))].mean(0)
    for row in added:  # new rows start at the mean embedding, not at random
        assert torch.allclose(rows[row], expected_mean.to(torch.bfloat16).float(), atol=1e-2)
    assert AutoProcessor.from_pretrained(out).tokenizer.pad_token is not None


def test_text_only_conversations_render_byte_identical_to_the_llm_template(tiny_dir, tiny_graft):
    llm_tok = AutoTokenizer.from_pretrained(tiny_dir / "qwen3")
    processor = AutoProcessor.from_pretrained(tiny_graft)
    for messages in CONVERSATIONS:
        for kwargs in ({}, {"add_generation_prompt": True}, {"add_generation_prompt": True, "enable_thinking": False}):
            for tools in (None, TOOLS):
                expected = llm_tok.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
                got = processor.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
                assert got == expected
                assert processor.apply_chat_template(messages, tools=tools, **kwargs) == expected


def test_image_parts_render_placeholder_and_expand_to_tiles(tiny_graft):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "这是什么颜色？"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tools=TOOLS)
    assert "<|im_start|>user\n<|image_pad|>这是什么颜色？<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and "get_weather" in text
    batch = processor(text=[text], images=[[Image.new("RGB", (64, 48), "red")]], return_tensors="pt")
    decoded = processor.tokenizer.decode(batch["input_ids"][0])
    assert "<|vision_start|><row_1_col_1>" in decoded and "<|vision_pad|>" in decoded
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 5 * processor.image_seq_len


def test_output_folder_is_never_overwritten_without_force(tiny_dir, tiny_graft):
    before = (tiny_graft / "model.safetensors").read_bytes()
    with pytest.raises(VlmgraftError, match="--force"):
        build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "qwen3"), out=tiny_graft),
              log=lambda *_: None)
    assert (tiny_graft / "model.safetensors").read_bytes() == before
    guard_output(tiny_graft.parent / "does-not-exist-yet", force=False)  # a new folder is fine


def test_force_overwrites(tiny_dir, tmp_path):
    out = tmp_path / "g"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "qwen3"), out=out, force=True),
          log=lambda *_: None)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_offline_hub_id_gives_one_clear_sentence_quickly(tiny_dir, tmp_path):
    start = time.perf_counter()
    with pytest.raises(VlmgraftError) as err:
        build(BuildOptions(vision=str(tiny_dir / "donor"), llm="Qwen/Qwen3-0.6B", out=tmp_path / "x"),
              log=lambda *_: None)
    message = str(err.value)
    assert "'Qwen/Qwen3-0.6B'" in message and "local folder" in message and "Traceback" not in message
    assert time.perf_counter() - start < 30
    with pytest.raises(VlmgraftError, match="does not exist"):
        build(BuildOptions(vision="./no/such/folder", llm=str(tiny_dir / "qwen3"), out=tmp_path / "y"),
              log=lambda *_: None)


def test_cli_build_reports_errors_without_traceback(tiny_dir, tmp_path, capsys):
    from vlmgraft.cli import main

    assert main(["build", "--vision", str(tiny_dir / "donor"), "--llm", "Qwen/Qwen3-0.6B", "--out",
                 str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert any(line.startswith("error: ") and "Qwen/Qwen3-0.6B" in line for line in err.splitlines())
    assert "Traceback" not in err


def test_unsupported_donor_family_is_named(tiny_dir, tmp_path):
    with pytest.raises(VlmgraftError, match="model_type 'qwen3'"):
        build(BuildOptions(vision=str(tiny_dir / "qwen3"), llm=str(tiny_dir / "qwen3"), out=tmp_path / "x"),
              log=lambda *_: None)
