"""`vlmgraft chat`: one-shot JSON for scripts, the multi-turn session with /image, /reset, /exit, image policy."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from vlmgraft.cli import main
from vlmgraft.errors import VlmgraftError
from vlmgraft.infer.chat import ChatOptions, ChatSession, run_chat
from vlmgraft.infer.model import load_for_inference


def test_one_shot_json_for_scripts(tiny_graft, tmp_path, capsys):
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture)
    code = main(["chat", str(tiny_graft), "--image", str(picture), "--prompt", "what colour is this", "--json",
                 "--max-new-tokens", "5", "--temperature", "0", "--no-think", "--device", "cpu"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"answer", "reasoning", "tokens", "seconds"}
    assert isinstance(result["answer"], str) and 1 <= result["tokens"] <= 5 and result["seconds"] > 0
    assert result["prompt_tokens"] > 20  # the image's placeholder tokens are in the prompt


def test_remote_images_need_the_flag(tiny_graft, capsys):
    code = main(["chat", str(tiny_graft), "--image", "https://example.com/cat.png", "--prompt", "hi",
                 "--device", "cpu"])
    assert code == 2 and "--allow-remote-images" in capsys.readouterr().err


def test_interactive_session_keeps_history_and_images(tiny_graft, tmp_path, monkeypatch):
    picture = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture)
    calls = []
    from vlmgraft.infer import generate as generate_module

    real = generate_module.generate

    def spy(model, processor, conversations, images, **kwargs):
        calls.append((conversations[0], [im.size for im in images[0]], kwargs))
        return real(model, processor, conversations, images, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spy)
    lines = iter([f"/image {picture}", "what colour is this", "/image /no/such/file.png", "and now?", "/reset",
                  "hello", "/exit", "never read"])
    out, err = io.StringIO(), io.StringIO()
    code = run_chat(ChatOptions(model=str(tiny_graft), max_new_tokens=3, temperature=0.0, device="cpu", think=False),
                    input_fn=lambda _: next(lines), out=out, err=err)
    assert code == 0 and len(calls) == 3
    first, second, third = calls
    assert first[1] == [(64, 48)] and first[0][-1]["content"][0] == {"type": "image"}
    assert len(second[0]) == 3 and second[0][1]["role"] == "assistant" and second[1] == [(64, 48)]
    assert len(third[0]) == 1 and third[1] == []  # /reset forgot the turns and the image
    assert all(kwargs["enable_thinking"] is False and kwargs["temperature"] == 0.0 for _, _, kwargs in calls)
    assert "image added" in err.getvalue() and "does not exist" in err.getvalue()
    assert "conversation cleared" in err.getvalue() and out.getvalue().count("\n") >= 3


def test_reasoning_goes_to_stderr_and_the_answer_to_stdout(tiny_graft, monkeypatch):
    from vlmgraft.infer import generate as generate_module
    from vlmgraft.infer.generate import GenerationResult

    raw = "<think>\nred pixels\n</think>\n\nIt is red."

    def scripted(model, processor, conversations, images, stream=None, **kwargs):
        for piece in (raw[:5], raw[5:17], raw[17:30], raw[30:]):
            stream(0, piece)
        return [GenerationResult("It is red.", "red pixels", raw, 10, 9, "stop")]

    monkeypatch.setattr(generate_module, "generate", scripted)
    model, processor = load_for_inference(tiny_graft, device="cpu")
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(model, processor, ChatOptions(model=str(tiny_graft)), out, err)
    result, _ = session.ask("what colour?")
    assert out.getvalue() == "It is red.\n" and "red pixels" in err.getvalue()
    assert session.history[-1] == {"role": "assistant", "content": "It is red."}  # reasoning stays out of history
    with pytest.raises(VlmgraftError, match="allow-remote-images"):
        session.add_image("http://example.com/x.png")
