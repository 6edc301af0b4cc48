"""Loading, the batched `generate` helper, prompts with the thinking switch, streaming text, image references."""

from __future__ import annotations

import base64
import io
import random

import pytest
import torch
from PIL import Image

from vlmgraft.errors import VlmgraftError
from vlmgraft.images import ImageError, ImagePolicy, load_image
from vlmgraft.infer.generate import generate
from vlmgraft.infer.model import load_for_inference, pick_device, pick_dtype
from vlmgraft.infer.prompts import ReasoningSplitter, render_prompt, split_reasoning, supports_thinking
from vlmgraft.infer.textstream import TextStream

RED = Image.new("RGB", (64, 48), (200, 30, 30))
BLUE = Image.new("RGB", (40, 64), (20, 30, 200))
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is this"}]}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "两张图"}]}],
]
IMAGES = [[RED], [], [RED, BLUE]]




def test_auto_device_and_dtype_and_clear_errors(tiny_graft, tmp_path):
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    model, processor = load_for_inference(tiny_graft, device="cpu")
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert processor.tokenizer.pad_token is not None
    with pytest.raises(VlmgraftError, match="config.json"):
        load_for_inference(tmp_path)
    with pytest.raises(VlmgraftError, match="dtype"):
        pick_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["hf", "engine"])
def test_batched_left_padded_generation_equals_one_at_a_time(loaded, backend):
    model, processor = loaded
    streamed: dict[int, list[str]] = {}
    batched = generate(model, processor, CONVERSATIONS, IMAGES, max_new_tokens=8, backend=backend, batch_size=2,
                       stream=lambda i, delta: streamed.setdefault(i, []).append(delta))  # 3 prompts, 2 at a time
    single = [generate(model, processor, [conv], [imgs], max_new_tokens=8, backend="hf")[0]
              for conv, imgs in zip(CONVERSATIONS, IMAGES, strict=True)]
    assert [r.raw_text for r in batched] == [r.raw_text for r in single]
    assert len({r.raw_text for r in single}) == len(single)
    for i, result in enumerate(batched):
        assert "".join(streamed.get(i, [])) == result.raw_text
        assert result.prompt_tokens > 0 and 0 < result.completion_tokens <= 8
        assert result.finish_reason in ("stop", "length")
    assert batched[0].prompt_tokens > batched[1].prompt_tokens  # the image's 20 placeholder tokens are counted


def test_stop_strings_cut_the_answer(loaded):
    model, processor = loaded
    full = generate(model, processor, CONVERSATIONS[1:2], max_new_tokens=8)[0]
    stop = full.raw_text[3:5]
    cut = generate(model, processor, CONVERSATIONS[1:2], max_new_tokens=8, stop=[stop])[0]
    assert cut.raw_text == full.raw_text[:full.raw_text.index(stop)]
    assert cut.finish_reason == "stop"


def test_thinking_switch_reaches_the_template_only_when_set(loaded):
    _, processor = loaded
    assert supports_thinking(processor)
    off = render_prompt(processor, CONVERSATIONS[1], enable_thinking=False)
    default = render_prompt(processor, CONVERSATIONS[1])
    assert off.endswith("<think>\n\n</think>\n\n") and "<think>" not in default


def test_reasoning_is_split_from_the_answer_whole_and_streamed():
    cases = {
        "<think>\nthe shape is red\n</think>\n\nIt is red.": ("It is red.", "the shape is red"),
        "It is red.": ("It is red.", None),
        "<think>still thinking": ("", "still thinking"),
        "\n<think></think>\n\n答案": ("答案", ""),
    }
    rng = random.Random(0)
    for raw, expected in cases.items():
        assert split_reasoning(raw) == expected
        for _ in range(20):  # any chunking gives the same split, tags cut anywhere included
            cuts = sorted(rng.sample(range(1, len(raw)), k=min(4, len(raw) - 1)))
            pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
            splitter, thought, answer = ReasoningSplitter(), [], []
            for k, piece in enumerate(pieces):
                t, a = splitter.feed(piece, final=k == len(pieces) - 1)
                thought.append(t)
                answer.append(a)
            assert "".join(answer) == expected[0]
            assert "".join(thought).strip() == (expected[1] or "")
    assert split_reasoning("the shape is red\n</think>\n\nred", opened=True) == ("red", "the shape is red")


def test_text_stream_keeps_characters_whole_and_holds_back_stop_strings(loaded):
    tokenizer = loaded[1].tokenizer
    text = "红色的圆形在左边 red circle on the left"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    deltas = [stream.push([i]) for i in ids] + [stream.finish()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    stream = TextStream(tokenizer, stop=["circle"])
    out = "".join(stream.push([i]) for i in ids) + stream.finish()
    assert out == "红色的圆形在左边 red " and stream.stopped


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_references_follow_the_policy(tmp_path):
    data = _png_bytes(RED)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert load_image(url, ImagePolicy()).size == (64, 48)
    path = tmp_path / "red.png"
    path.write_bytes(data)
    assert load_image(str(path), ImagePolicy(allow_local=True)).mode == "RGB"
    assert load_image(path.as_uri(), ImagePolicy(allow_local=True)).size == (64, 48)
    with pytest.raises(ImageError, match="allow-local-files"):
        load_image(str(path), ImagePolicy(allow_local=False))
    with pytest.raises(ImageError, match="allow-remote-images"):
        load_image("https://example.com/cat.png", ImagePolicy())
    with pytest.raises(ImageError) as too_big:
        load_image(url, ImagePolicy(max_bytes=len(data) - 1))
    assert too_big.value.status == 413
    with pytest.raises(ImageError, match="base64"):
        load_image("data:image/png;base64,@@@not-base64@@@", ImagePolicy())
    with pytest.raises(ImageError, match="decode"):
        load_image("data:image/png;base64," + base64.b64encode(b"not an image").decode(), ImagePolicy())
