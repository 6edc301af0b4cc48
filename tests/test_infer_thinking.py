"""A model trained with `enable_thinking: false` answers that way by default in chat, serve and webui.

Training records the switch next to the model (vlmgraft_checkpoint.json, passed on by merge as merge_report.json);
the inference commands read it back as their default, and an explicit --think/--no-think or request still wins.
"""

from __future__ import annotations

import io
import json

import pytest

from vlmgraft.data.shapes import ShapesWorld
from vlmgraft.export.merge import MergeOptions, merge
from vlmgraft.infer import openai_api as api
from vlmgraft.infer.chat import ChatOptions, ChatSession
from vlmgraft.infer.limits import PixelTally
from vlmgraft.infer.prompts import prepare, recorded_thinking
from vlmgraft.infer.serve import ServeOptions, build_app
from vlmgraft.infer.server import _prepare
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.run import train


@pytest.fixture(scope="module")
def trained(tiny_graft, tmp_path_factory):
    """The final folder of a one-step align run with thinking switched off (the training default)."""
    root = tmp_path_factory.mktemp("thinking")
    data = str(ShapesWorld(image_size=64, seed=1).write(root / "vqa", "messages", 8, lang="zh", task="colour"))
    config = TrainConfig(model=str(tiny_graft), data=data, output_dir=str(root / "run"), stage="align",
                         report_to=["none"], max_steps=1, save_steps=100, per_device_train_batch_size=4,
                         num_sample_images=0)
    config.data_settings.num_workers = 0
    config.data_settings.eval_size = 0
    config.data_settings.max_length = 256
    assert config.data_settings.enable_thinking is False
    return train(config, echo=lambda *_: None).final_dir


def test_training_records_the_switch_and_merge_passes_it_on(trained, tmp_path):
    assert json.loads((trained / "vlmgraft_checkpoint.json").read_text())["enable_thinking"] is False
    assert recorded_thinking(trained) is False
    merge(MergeOptions(source=str(trained), out=tmp_path / "merged", dtype="float32"), log=lambda *_: None)
    assert recorded_thinking(tmp_path / "merged") is False


def test_records_are_read_back_old_and_new(tmp_path, tiny_graft):
    assert recorded_thinking(tiny_graft) is None  # a fresh graft: the template's own default
    new = tmp_path / "new"
    new.mkdir()
    (new / "vlmgraft_checkpoint.json").write_text(json.dumps({"stage": "full", "enable_thinking": True}))
    assert recorded_thinking(new) is True
    old = tmp_path / "old"  # a run from before the top-level key: its config holds the switch
    old.mkdir()
    (old / "vlmgraft_checkpoint.json").write_text(json.dumps({"config": {"data_settings": {"enable_thinking": False}}}))
    assert recorded_thinking(old) is False


def test_chat_defaults_to_the_recorded_switch_and_flags_override(loaded, trained, tiny_graft, monkeypatch):
    from vlmgraft.infer import generate as generate_module

    model, processor = loaded
    seen = []
    real = generate_module.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["enable_thinking"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spy)
    for folder, think in ((trained, None), (trained, True), (tiny_graft, None)):
        session = ChatSession(model, processor, ChatOptions(model=str(folder), think=think, max_new_tokens=2),
                              out=io.StringIO(), err=io.StringIO())
        session.ask("hello", stream=False)
    assert seen == [False, True, None]


def test_serve_defaults_to_the_recorded_switch_and_requests_override(loaded, trained):
    model, processor = loaded
    app = build_app(ServeOptions(model=str(trained), device="cpu", max_batch_size=2, max_model_len=256), model,
                    processor)
    state = app.state.vlmgraft
    assert state.template_defaults == {"enable_thinking": False}
    conversation = [{"role": "user", "content": "hello"}]
    for kwargs, expected in (({}, False), ({"enable_thinking": True}, True)):
        body = {"model": state.model_id, "messages": conversation, "chat_template_kwargs": kwargs}
        chat = api.parse_chat_request(body, state.defaults)
        assert _prepare(state, chat, PixelTally(state.limits), []).input_ids == prepare(processor, conversation, [], expected).input_ids
    explicit = build_app(ServeOptions(model=str(trained), device="cpu", max_batch_size=2, max_model_len=256,
                                      think=True), model, processor)
    assert explicit.state.vlmgraft.template_defaults == {"enable_thinking": True}


def test_webui_thinking_box_starts_at_the_recorded_switch(loaded, trained, tiny_graft):
    import gradio  # the [webui] extra, in [dev]

    from vlmgraft.infer.webui import Backend, Page, WebuiOptions

    model, processor = loaded

    def box(folder, think=None):
        options = WebuiOptions(model=str(folder), think=think, device="cpu", max_batch_size=1, max_model_len=256)
        return Page(Backend(options, model, processor), gradio).thinking_value()

    assert box(trained) is False and box(trained, think=True) is True
    assert box(tiny_graft) is True  # nothing recorded: the Qwen3 template thinks by default
