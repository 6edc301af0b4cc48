"""`stage: grpo`: prompt readers, the rollout settings that must agree with training, and a run whose weights move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmgraft.data.render import ChatRenderer
from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.rl.data import read_prompts
from vlmgraft.train.rl.grpo import end_of_turn_id, ensure_stop_at_end_of_turn, grpo_args, prompt_dataset

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture(scope="module")
def grpo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    (root / "img").mkdir()
    for i, colour in enumerate(["red", "green", "blue", "red"]):
        Image.new("RGB", (40, 40), colour).save(root / "img" / f"{i}.png")
    return root


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _swift_rows(n=4):
    return [{"messages": [{"role": "user", "content": "<image>Which colour?"}], "images": [f"img/{i % 4}.png"],
             "solution": ["red", "green", "blue", "red"][i % 4], "difficulty": i} for i in range(n)]


def _config(model, data, out, **grpo) -> TrainConfig:
    config = TrainConfig(model=str(model), data=str(data), output_dir=str(out), stage="grpo", report_to=["none"],
                         learning_rate=5e-2, warmup_ratio=0.0, max_steps=1, save_steps=1, logging_steps=1,
                         per_device_train_batch_size=4, seed=3)
    config.grpo = {"num_generations": 2, "max_completion_length": 6, "loss_type": "dapo", **grpo}
    return config


def test_swift_and_trl_rows_keep_every_extra_column(grpo_dir):
    trl = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
           "image": "img/2.png", "answer": "blue"}
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
           {"prompt": "Colour?", "images": ["img/none.png"]}]
    rows, skips = read_prompts(_write(grpo_dir / "p.jsonl", [*_swift_rows(1), trl, *bad]))
    assert rows[0]["solution"] == "red" and rows[0]["difficulty"] == 0
    assert rows[0]["images"] == [str(grpo_dir / "img" / "0.png")]
    assert [p["type"] for p in rows[0]["prompt"][0]["content"]] == ["image", "text"]
    assert rows[1]["answer"] == "blue" and rows[1]["images"] == [str(grpo_dir / "img" / "2.png")]
    assert skips["row rejected"] == 2
    examples = " ".join(skips.examples("row rejected"))
    assert "p.jsonl:3" in examples and "user's turn" in examples and "p.jsonl:4" in examples
    item = prompt_dataset(rows)[0]
    assert isinstance(item["images"][0], Image.Image) and item["prompt"][0]["role"] == "user"


def test_mixing_image_rows_and_text_only_rows_is_refused_clearly(grpo_dir):
    text_only = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "solution": "4"}
    with pytest.raises(VlmgraftError, match=r"1 are text-only \(e\.g\. .*mixed\.jsonl:3\).*separate runs"):
        read_prompts(_write(grpo_dir / "mixed.jsonl", [*_swift_rows(2), text_only]))


@pytest.mark.parametrize("thinking", [False, True])
def test_rollout_prompt_renders_the_think_block_as_training_does(tiny_graft, grpo_dir, thinking):
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    processor = AutoProcessor.from_pretrained(tiny_graft)
    config = _config(tiny_graft, "d", grpo_dir / "unused")
    config.data_settings.enable_thinking = thinking
    args = grpo_args(config)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    filled = prepare_multimodal_messages(prompt, images=[Image.new("RGB", (40, 40))])
    rollout = apply_chat_template({"prompt": filled}, processor, **args.chat_template_kwargs)["prompt"]
    trained = ChatRenderer(processor, enable_thinking=thinking).render(
        [*prompt, {"role": "assistant", "content": "red"}])
    answer_start = trained.spans[-1][0]
    assert trained.text.startswith(rollout)
    if not thinking:  # the empty block is in the prompt at both times, and the answer follows it
        assert rollout.endswith("<think>\n\n</think>\n\n") and len(rollout) == answer_start
    else:
        assert "<think>" not in rollout[rollout.rindex("assistant"):]


def test_generation_stops_at_the_end_of_turn_token(tiny_graft):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft)
    turn_end = end_of_turn_id(processor)
    assert processor.tokenizer.convert_ids_to_tokens(turn_end) == "<|im_end|>"
    model.generation_config.eos_token_id = [processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert turn_end in ensure_stop_at_end_of_turn(model, processor)
    assert turn_end in model.generation_config.eos_token_id


def test_use_vllm_is_refused_for_smolvlm_grafts(tiny_graft, grpo_dir, tmp_path):
    from vlmgraft.train.run import train

    data = _write(grpo_dir / "v.jsonl", _swift_rows(2))
    with pytest.raises(VlmgraftError, match="vLLM.*Idefics3.*Llama"):
        train(_config(tiny_graft, data, tmp_path / "run", rewards=["accuracy"], use_vllm=True),
              echo=lambda *_: None)


def test_grpo_step_moves_lora_and_connector_and_rewards_see_the_columns(tiny_graft, grpo_dir, tmp_path,
                                                                        monkeypatch):
    from vlmgraft.train.run import train

    monkeypatch.syspath_prepend(str(HELPERS))
    import rl_reward_plugin

    rl_reward_plugin.SEEN.clear()
    data = _write(grpo_dir / "run.jsonl", _swift_rows(4))
    config = _config(tiny_graft, data, tmp_path / "run", temperature=1.5,
                     rewards=["rl_reward_plugin:length_reward", "rl_reward_plugin:record_reward", "accuracy"])
    result = train(config, echo=lambda *_: None)
    seen = rl_reward_plugin.SEEN[0]
    assert {"solution", "difficulty", "completion_ids"} <= set(seen)
    assert isinstance(seen["prompts"][0], list) and isinstance(seen["completions"][0], list)
    weights = load_file(result.final_dir / "adapter_model.safetensors")
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())  # LoRA B starts at zero
    base = load_file(Path(tiny_graft) / "model.safetensors")
    assert any("connector" in k and not torch.equal(w.float(), base[k.replace("base_model.model.", "").replace(
        ".modules_to_save.default", "")].float()) for k, w in weights.items() if "connector" in k)
    assert not any("vision_model" in k for k in weights) and not (result.final_dir / "ref").exists()
    history = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    assert "rewards/accuracy_reward/mean" in history[0]
