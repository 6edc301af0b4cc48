"""The collator: exact processor parity, loss masks, overflow policies, packing without cross-sample attention,
uint8 tiles, and stats that add up across DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, SmolVLMImageProcessor

from vlmgraft.data.collate import UInt8Tiles, VisionChatCollator
from vlmgraft.data.dataset import ListDataset
from vlmgraft.data.sample import Sample
from vlmgraft.data.shapes import ShapesWorld
from vlmgraft.data.tiles import ImageEncoder, tile_grid
from vlmgraft.graft.template import extend_chat_template

WORLD = ShapesWorld(image_size=(64, 48), max_shapes=2, seed=7)


@pytest.fixture(scope="module")
def processor(tiny_graft):
    return AutoProcessor.from_pretrained(tiny_graft)


def _conversation(image: Image.Image) -> Sample:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "图中形状是什么颜色？"}]},
                {"role": "assistant", "content": "红色"},
                {"role": "user", "content": [{"type": "text", "text": "how many?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "two shapes"}]},
                {"role": "user", "content": [{"type": "text", "text": "ok?"}]},
                {"role": "assistant", "content": "yes"}]
    return Sample(messages=messages, images=[image], source="t", origin="conv")


def _trained_runs(tokenizer, input_ids, labels) -> list[str]:
    """Decoded runs of consecutive loss-carrying tokens."""
    runs, current = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist(), strict=True):
        if label != -100:
            assert label == token  # labels are the ids themselves; the model shifts them
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_matches_processor_and_masks_everything_but_answers(processor):
    sample = _conversation(WORLD.scene(0).image)
    collator = VisionChatCollator(processor, max_length=1024)
    encoded = collator.encode(sample)
    text = processor.apply_chat_template(sample.messages, enable_thinking=False)
    reference = processor(text=[text], images=[sample.images], return_tensors="pt", add_special_tokens=False)
    assert encoded.input_ids.tolist() == reference["input_ids"][0].tolist()
    assert torch.equal(encoded.tiles, reference["pixel_values"][0])
    runs = _trained_runs(processor.tokenizer, encoded.input_ids, encoded.labels)
    assert runs == ["红色<|im_end|>", "two shapes<|im_end|>", "yes<|im_end|>"]

    batch = collator([sample, WORLD.vqa_samples(1, "en", "count")[0], None])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "pixel_attention_mask",
                          "loss_plan"}
    plan, labelled = batch["loss_plan"], batch["labels"][:, 1:] != -100
    assert list(plan.columns) == labelled.any(0).nonzero().squeeze(1).tolist()  # what the loss would read back
    assert (plan.label_tokens, plan.tokens, plan.samples) == (labelled.sum(), batch["attention_mask"].sum(), 2)
    short = batch["attention_mask"][1] == 0
    assert short.any() and (batch["labels"][1][short] == -100).all()  # padding carries no loss
    assert (batch["input_ids"][1][short] == processor.tokenizer.pad_token_id).all()
    image_positions = batch["input_ids"] == processor.image_token_id
    assert (batch["labels"][image_positions] == -100).all()
    assert batch["pixel_attention_mask"].dtype == torch.bool and batch["pixel_values"].shape[:2] == (2, 5)
    assert collator.stats["skipped rows reaching the collator"] == 1

    everything = VisionChatCollator(processor, loss_on="all").encode(sample)
    runs = _trained_runs(processor.tokenizer, everything.input_ids, everything.labels)
    assert len(runs) == 2  # all text is trained; only the image's expansion (markers and image tokens) is not
    assert runs[0] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert runs[1].startswith("图中形状是什么颜色？<|im_end|>") and runs[1].endswith("yes<|im_end|>\n")


def test_llama_template_eot_and_no_images(tiny_dir, tmp_path):
    from vlmgraft.graft.build import BuildOptions, build

    out = tmp_path / "llama-graft"
    build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "llama3"), out=out), log=lambda *_: None)
    processor = AutoProcessor.from_pretrained(out)
    encoded = VisionChatCollator(processor).encode(_conversation(WORLD.scene(1).image))
    assert _trained_runs(processor.tokenizer, encoded.input_ids, encoded.labels) == \
        ["红色<|eot_id|>", "two shapes<|eot_id|>", "yes<|eot_id|>"]
    text_only = Sample(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    batch = VisionChatCollator(processor)([text_only])
    assert "pixel_values" not in batch
    assert _trained_runs(processor.tokenizer, batch["input_ids"][0], batch["labels"][0]) == ["hello<|eot_id|>"]


def test_tool_calls_are_trained_and_tool_results_are_not(processor, tmp_path):
    import json

    from vlmgraft.data.messages import MessagesSource

    row = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "天气?"}]},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "北京"}}}]},
        {"role": "tool", "content": "晴"},
        {"role": "assistant", "content": "晴天"}]}
    WORLD.scene(4).image.save(tmp_path / "a.png")
    (tmp_path / "t.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    sample = MessagesSource(tmp_path / "t.jsonl").get(0)
    encoded = VisionChatCollator(processor).encode(sample)
    runs = _trained_runs(processor.tokenizer, encoded.input_ids, encoded.labels)
    assert runs == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>',
                    "晴天<|im_end|>"]


# A Qwen3-like template that, as the real one does, writes a think block into assistant turns after the last user
# turn (empty unless reasoning_content is set) and none into earlier turns.
THINKING_TEMPLATE = """\
{%- set ns = namespace(last_user=0) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'system' or message.role == 'user' %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if loop.index0 > ns.last_user %}
{{- '<think>\\n' + (message.reasoning_content or '') + '\\n</think>\\n\\n' }}
{%- endif %}
{{- message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}
"""


def test_think_block_of_the_last_turn_is_prompt_but_reasoning_is_trained(tiny_graft):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    processor.chat_template = extend_chat_template(THINKING_TEMPLATE, processor.image_token,
                                                   processor.tokenizer.video_token)
    sample = _conversation(WORLD.scene(2).image)
    encoded = VisionChatCollator(processor).encode(sample)
    assert "<think>\n\n</think>\n\nyes" in processor.tokenizer.decode(encoded.input_ids)
    assert _trained_runs(processor.tokenizer, encoded.input_ids, encoded.labels) == \
        ["红色<|im_end|>", "two shapes<|im_end|>", "yes<|im_end|>"]
    sample.messages[-1] = {"role": "assistant", "content": "yes", "reasoning_content": "it is fine"}
    encoded = VisionChatCollator(processor).encode(sample)
    assert _trained_runs(processor.tokenizer, encoded.input_ids, encoded.labels)[-1] == \
        "<think>\nit is fine\n</think>\n\nyes<|im_end|>"


def _tokenizer_render(processor, messages) -> str:
    return processor.tokenizer.apply_chat_template(messages, tokenize=False)


def test_the_qwen3_fixture_template_moves_inline_reasoning_as_qwen3_does(processor):
    inline = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nmull\n</think>\n\nhello"},
              {"role": "user", "content": "how?"}, {"role": "assistant", "content": "<think>\n muse \n\n</think>fine"}]
    split = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "how?"}, {"role": "assistant", "content": "fine", "reasoning_content": " muse "}]
    text = _tokenizer_render(processor, inline)
    assert text == _tokenizer_render(processor, split)  # inline reasoning is split off the content
    assert "mull" not in text  # and dropped from turns before the last user query
    assert text.endswith("<|im_start|>assistant\n<think>\n muse \n</think>\n\nfine<|im_end|>\n")


def test_inline_reasoning_is_trained_in_every_turn_that_keeps_it(processor, tiny_dir, tmp_path):
    from vlmgraft.graft.build import BuildOptions, build

    image = WORLD.scene(5).image
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                {"role": "assistant", "content": "<think>\nit looks red\n</think>\n\n红色"},
                {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {"role": "assistant", "content": "<think>\nask the tool\n</think>\n\n", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
                {"role": "tool", "content": "晴"},
                {"role": "assistant", "content": "<think>\nsunny\n</think>\n\n晴天"}]
    collator = VisionChatCollator(processor)
    encoded = collator.encode(Sample(messages=messages, images=[image], origin="inline"))
    assert _trained_runs(processor.tokenizer, encoded.input_ids, encoded.labels) == [
        "红色<|im_end|>",  # before the last query: the template dropped the reasoning, the answer is still trained
        '<think>\nask the tool\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}'
        "\n</tool_call><|im_end|>",
        "<think>\nsunny\n</think>\n\n晴天<|im_end|>"]

    out = tmp_path / "llama-graft"  # a template that leaves content as written trains it as written
    build(BuildOptions(vision=str(tiny_dir / "donor"), llm=str(tiny_dir / "llama3"), out=out), log=lambda *_: None)
    llama = AutoProcessor.from_pretrained(out)
    encoded = VisionChatCollator(llama).encode(Sample(messages=messages[:2], images=[image]))
    assert _trained_runs(llama.tokenizer, encoded.input_ids, encoded.labels) == \
        ["<think>\nit looks red\n</think>\n\n红色<|eot_id|>"]


def test_a_turn_the_template_rewrites_past_alignment_is_rejected_and_named(tiny_graft):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    rewriting = THINKING_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}",
                                          "{{- '<|im_start|>assistant' + (' (asked back)' if message.content.endswith('?')"
                                          " else '') + '\\n' }}")
    assert rewriting != THINKING_TEMPLATE
    processor.chat_template = extend_chat_template(rewriting, processor.image_token, processor.tokenizer.video_token)
    collator = VisionChatCollator(processor)
    sample = Sample(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "why?"}],
                    origin="asks.jsonl:3")
    assert collator.encode(sample) is None
    assert collator.stats["sample rejected: chat template rewrote an assistant turn"] == 1


def _image_tokens(encoded, processor) -> int:
    return int((encoded.input_ids == processor.image_token_id).sum())


def test_overflow_policies_never_cut_an_image_and_are_counted(processor):
    sample = _conversation(WORLD.scene(3).image)
    full = VisionChatCollator(processor, max_length=4096).encode(sample)
    two_turns = Sample(messages=sample.messages[:5], images=sample.images)
    shorter = VisionChatCollator(processor, max_length=4096).encode(two_turns)
    assert _image_tokens(full, processor) == 5 * processor.image_seq_len  # 2×2 tiles + global

    skip = VisionChatCollator(processor, max_length=len(full) - 1, overflow="skip")
    assert skip.encode(sample) is None and skip.stats["overflow: skipped"] == 1

    drop = VisionChatCollator(processor, max_length=len(shorter), overflow="drop_turns")
    dropped = drop.encode(sample)
    assert dropped.input_ids.tolist() == shorter.input_ids.tolist()
    assert drop.stats["overflow: dropped turns"] == 1

    fewer = VisionChatCollator(processor, max_length=len(full) - 1, overflow="fewer_tiles")
    reduced = fewer.encode(sample)
    assert len(reduced) <= len(full) - 1 and _image_tokens(reduced, processor) == processor.image_seq_len
    assert reduced.tiles.shape[0] == 1 and fewer.stats["overflow: fewer tiles"] == 1
    assert len(_trained_runs(processor.tokenizer, reduced.input_ids, reduced.labels)) == 3  # no turn lost

    long = Sample(messages=[sample.messages[1], {"role": "assistant", "content": "红色 " * 200}], images=sample.images)
    cut = VisionChatCollator(processor, max_length=full.image_end + 10, overflow="drop_turns")
    truncated = cut.encode(long)
    assert len(truncated) == full.image_end + 10
    assert _image_tokens(truncated, processor) == _image_tokens(full, processor)
    assert (truncated.labels != -100).any() and cut.stats["overflow: truncated"] == 1
    inside = VisionChatCollator(processor, max_length=20, overflow="drop_turns")  # would cut through the image
    assert inside.encode(long) is None and inside.stats["overflow: skipped"] == 1
    assert inside([long]) == {} and inside.stats["empty batches"] == 1


def _per_token_loss(model, batch):
    logits = model(**batch, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100,
                           reduction="none")


def test_packing_gives_each_sample_the_loss_it_has_alone(processor, tiny_graft):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32).eval()
    samples = WORLD.vqa_samples(3, "zh", "mixed") + WORLD.caption_samples(2, "en", start=3)
    samples.append(Sample(messages=[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]))
    single = VisionChatCollator(processor, max_length=400)
    packer = VisionChatCollator(processor, max_length=400, packing=True)
    with torch.no_grad():
        alone = sorted(_per_token_loss(model, single([s])).sum().item() for s in samples)
        batch = packer(samples)
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] < len(samples)
        losses = _per_token_loss(model, batch)
        packed = []
        for row in range(batch["input_ids"].shape[0]):
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
            packed += [losses[row, a:b - 1].sum().item() for a, b in zip(starts[:-1], starts[1:], strict=True)]
        packed = sorted(v for v in packed if v)  # the padding tail is its own segment with no loss
        assert np.allclose(packed, alone, atol=1e-4, rtol=0)
        crossing = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))  # attention across samples
        leaked = _per_token_loss(model, crossing)
        assert not torch.allclose(leaked, losses, atol=1e-4)  # the check above can fail: masks matter


def test_uint8_tiles_match_the_processor_and_normalise_on_device(processor):
    rng = np.random.default_rng(0)
    for tile, longest in [(32, 64), (48, 160)]:
        image_processor = SmolVLMImageProcessor(do_image_splitting=True, max_image_size={"longest_edge": tile},
                                                size={"longest_edge": longest})
        stock, fast = ImageEncoder(image_processor, "processor"), ImageEncoder(image_processor, "uint8")
        for width, height in [(13, 200), (200, 13), (64, 48), (33, 33), (100, 61), (31, 32), (320, 240)]:
            image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
            for split in (True, False):
                a, rows_a, cols_a = stock.encode(image, split=split)
                b, rows_b, cols_b = fast.encode(image, split=split)
                assert (rows_a, cols_a, a.shape) == (rows_b, cols_b, b.shape) and b.dtype == torch.uint8
                assert b.permute(0, 2, 3, 1).is_contiguous()  # channels-last: tiles are cut as whole pixel rows
                assert tile_grid(width, height, longest, tile, split) == (rows_a, cols_a)
                difference = ((b.float() / 255 - 0.5) / 0.5 - a).abs()
                assert difference.mean() < 0.01  # resampling rounding only
    samples = WORLD.vqa_samples(2, "en", "colour") + [Sample(messages=[{"role": "user", "content": "hi"},
                                                                       {"role": "assistant", "content": "yo"}])]
    reference = VisionChatCollator(processor)(samples)
    batch = VisionChatCollator(processor, pixels="uint8")(samples)
    assert isinstance(batch["pixel_values"], UInt8Tiles)
    with pytest.raises(AttributeError, match="to_device"):
        batch["pixel_values"].shape  # noqa: B018 - a model handed raw tiles fails loudly
    ready = VisionChatCollator(processor, pixels="uint8").to_device(batch, "cpu", torch.float32)
    assert torch.equal(ready["input_ids"], reference["input_ids"])
    assert (ready["pixel_values"] - reference["pixel_values"]).abs().max() < 0.2
    assert ready["pixel_values"].is_contiguous()  # planar again for the vision tower
    assert (ready["pixel_values"][2] == 0).all()  # the text-only row's padding tiles stay exactly 0


def test_collator_stats_add_up_across_workers(processor):
    samples = WORLD.vqa_samples(8, "zh", "colour")
    collator = VisionChatCollator(processor, max_length=512)
    loader = torch.utils.data.DataLoader(ListDataset(samples), batch_size=3, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == 8
    assert collator.stats["samples"] == 8 and collator.stats["batches"] == len(batches) == 3
    assert collator.stats["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
    from vlmgraft.data.report import data_report

    report = data_report(ListDataset(samples), collator)
    assert "samples 8, batches 3" in report and "shapes-vqa-zh 8" in report


def test_rows_rounded_up_to_a_multiple_keep_every_loss_and_the_config_key_is_checked(processor, tiny_graft):
    from vlmgraft.errors import VlmgraftError
    from vlmgraft.train.run import _pad_multiple

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32).eval()
    samples = WORLD.vqa_samples(3, "en", "mixed")
    plain, rounded = (VisionChatCollator(processor, max_length=400)(samples),
                      VisionChatCollator(processor, max_length=400, pad_to_multiple_of=64)(samples))
    assert rounded["input_ids"].shape[1] % 64 == 0 and rounded["input_ids"].shape[1] > plain["input_ids"].shape[1]
    assert rounded["loss_plan"].label_tokens == plain["loss_plan"].label_tokens
    with torch.no_grad():
        torch.testing.assert_close(_per_token_loss(model, rounded).sum(1), _per_token_loss(model, plain).sum(1))
    assert (_pad_multiple("auto", cuda=True), _pad_multiple("auto", cuda=False), _pad_multiple("8", False)) == (64, 1, 8)
    with pytest.raises(VlmgraftError, match="data_settings.pad_to_multiple_of"):
        _pad_multiple("sixty", cuda=True)


def test_the_gpu_normalisation_kernel_computes_what_eager_does():
    """On CUDA `to_device` normalises with one compiled kernel; compiled here for the CPU, it must give eager's
    values, with padding tiles exactly 0."""
    from vlmgraft.data.tiles import _channel_constants, _fused_normalize, _normalize

    tiles = torch.randint(0, 256, (2, 3, 3, 8, 8), dtype=torch.uint8)
    channels_last = tiles.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # how the collator ships them
    mask = torch.tensor([[True, True, False], [True, False, False]])
    mean, std = _channel_constants((0.48, 0.46, 0.41), (0.27, 0.26, 0.28), torch.device("cpu"))
    for dtype in (torch.float32, torch.bfloat16):
        eager, fused = _normalize(tiles, mask, mean, std, dtype), _fused_normalize()(tiles, mask, mean, std, dtype)
        assert fused.dtype == dtype
        torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-6)
        for normalize in (_normalize, _fused_normalize()):
            planar = normalize(channels_last, mask, mean, std, dtype)
            assert planar.is_contiguous()
            torch.testing.assert_close(planar, eager, rtol=1e-6, atol=1e-6)
        assert (fused[0, 2] == 0).all() and (fused[1, 1:] == 0).all() and (fused[0, 0] != 0).any()
