"""`stage: dpo`: preference readers (three layouts, bad rows), the pair collator, and a whole run on the tiny graft."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor

from vlmgraft.data.encode import IGNORE
from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.loading import load_config
from vlmgraft.train.rl.collate import PreferenceCollator, last_turn_mask
from vlmgraft.train.rl.data import as_dataset, read_preferences


@pytest.fixture(scope="module")
def pref_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    (root / "img").mkdir()
    for i, colour in enumerate(["red", "green", "blue", "red"]):
        Image.new("RGB", (48, 40), colour).save(root / "img" / f"{i}.png")
    return root


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _trl_rows(n=4):
    return [{"prompt": [{"role": "user", "content": [{"type": "image", "image": f"img/{i % 4}.png"},
                                                     {"type": "text", "text": "Which colour?"}]}],
             "chosen": ["red", "green", "blue", "red"][i % 4], "rejected": "purple"} for i in range(n)]


def test_trl_layout_with_inline_images_resolves_paths_and_strings(pref_dir):
    rows, skips = read_preferences(_write(pref_dir / "trl.jsonl", _trl_rows(2)))
    assert not skips.total()
    row = rows[0]
    assert row["images"] == [str(pref_dir / "img" / "0.png")]
    assert row["prompt"][0]["content"][0] == {"type": "image"}
    assert row["chosen"] == [{"role": "assistant", "content": "red"}]
    assert row["rejected"] == [{"role": "assistant", "content": "purple"}]
    assert row["origin"].endswith("trl.jsonl:1")


def test_rlaif_v_parquet_layout_with_image_bytes(pref_dir):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buffer, format="PNG")
    table = pa.table({
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": "A blue square."}]}]],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]}]],
        "prompt": [[{"role": "user", "content": [{"type": "image", "text": None},
                                                 {"type": "text", "text": "Describe the image."}]}]],
        "images": [[{"bytes": buffer.getvalue(), "path": None}]],
    })
    pq.write_table(table, pref_dir / "rlaif.parquet")
    rows, _ = read_preferences(pref_dir / "rlaif.parquet")
    assert rows[0]["images"][0].startswith("data:image;base64,")
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "A blue square."}]
    assert [p["type"] for p in rows[0]["prompt"][0]["content"]] == ["image", "text"]


def test_swift_dpo_layout_and_implicit_prompt(pref_dir):
    swift = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "<image>Which colour?"},
                          {"role": "assistant", "content": "green"}],
             "rejected_response": "red", "images": ["img/1.png"]}
    implicit = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}
    rows, skips = read_preferences(_write(pref_dir / "swift.jsonl", [swift, implicit]))
    assert not skips.total()
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
    assert rows[0]["chosen"][0]["content"] == "green" and rows[0]["rejected"][0]["content"] == "red"
    assert rows[0]["images"] == [str(pref_dir / "img" / "1.png")]
    assert rows[1]["prompt"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert rows[1]["images"] == []


def test_bad_rows_are_skipped_and_counted_with_file_and_line(pref_dir):
    good = _trl_rows(1)[0]
    bad = ["{not json", json.dumps({"prompt": "hi", "chosen": "a"}),
           json.dumps({**good, "chosen": [{"role": "user", "content": "x"}]}),
           json.dumps({**good, "images": ["img/2.png"]})]  # one placeholder already filled + one extra image
    path = _write(pref_dir / "bad.jsonl", [good, *bad])
    rows, skips = read_preferences(path)
    assert len(rows) == 1 and skips["row rejected"] == 4
    examples = " ".join(skips.examples("row rejected"))
    for line in (2, 3, 4, 5):
        assert f"bad.jsonl:{line}" in examples
    with pytest.raises(VlmgraftError, match="no usable preference row.*bad-only.jsonl:1"):
        read_preferences(_write(pref_dir / "bad-only.jsonl", bad[:1]))


def test_collator_keeps_every_image_token_and_marks_only_the_answers(tiny_graft, pref_dir):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    rows, _ = read_preferences(_write(pref_dir / "c.jsonl", _trl_rows(2)))
    collator = PreferenceCollator(processor)
    batch = collator(list(as_dataset(rows)))
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    real_tiles = batch["pixel_attention_mask"].flatten(2).any(-1).sum(1)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    for r in range(4):
        assert int((batch["input_ids"][r] == image_id).sum()) == int(real_tiles[r]) * processor.image_seq_len
    tokenizer = processor.tokenizer
    answers = [tokenizer.decode(batch["input_ids"][r][batch["completion_mask"][r].bool()]) for r in range(4)]
    assert answers[0].startswith("red") and answers[2].startswith("purple")
    assert all(a.rstrip().endswith("<|im_end|>") and "<think>" not in a for a in answers)
    prompt = tokenizer.decode(batch["input_ids"][0][: int(batch["completion_mask"][0].argmax())])
    generation = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith(generation[generation.index("<|im_start|>assistant"):])  # same empty think block


def test_short_max_length_is_an_error_naming_the_row_not_a_cut(tiny_graft, pref_dir):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    rows, _ = read_preferences(_write(pref_dir / "m.jsonl", _trl_rows(1)))
    with pytest.raises(VlmgraftError, match=r"m\.jsonl:1.*image tokens are never cut"):
        PreferenceCollator(processor, max_length=16)(list(as_dataset(rows)))


def test_last_turn_mask_takes_only_the_final_answer():
    labels = torch.tensor([IGNORE, 5, 6, IGNORE, IGNORE, 7, 8, IGNORE]).numpy()
    assert last_turn_mask(labels).tolist() == [False] * 5 + [True, True, False]


def test_dpo_section_keys_are_checked_and_cli_values_coerced(tmp_path):
    from trl import DPOConfig

    from vlmgraft.train.rl.common import trl_config

    config = load_config(None, model="m", data="d", stage="dpo", output_dir=str(tmp_path), report_to="none",
                         dpo={"beta": "0.3", "loss_type": "sigmoid"})
    args = trl_config(DPOConfig, config, "dpo", False, max_length=None)
    assert args.beta == 0.3 and args.max_length is None and args.loss_type == ["sigmoid"]
    config.dpo["betta"] = 1
    with pytest.raises(VlmgraftError, match="dpo.betta.*did you mean beta"):
        trl_config(DPOConfig, config, "dpo", False)


def test_dpo_run_trains_lora_and_connector_only_merges_and_evaluates(tiny_graft, pref_dir, tmp_path):
    from vlmgraft.export.merge import MergeOptions, merge
    from vlmgraft.train.run import train

    data = _write(pref_dir / "run.jsonl", _trl_rows(4))
    config = TrainConfig(model=str(tiny_graft), data=str(data), output_dir=str(tmp_path / "run"), stage="dpo",
                         report_to=["none"], learning_rate=5e-2, warmup_ratio=0.0, max_steps=2, save_steps=1,
                         logging_steps=1, per_device_train_batch_size=2, seed=3)
    config.dpo = {"beta": 0.1, "loss_type": "sigmoid"}
    result = train(config, echo=lambda *_: None)
    assert result.trainable["vision"]["trainable"] == 0 and result.trainable["connector"]["trainable"] > 0
    adapter_config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert "vision" not in adapter_config["target_modules"] and "text_model" in adapter_config["target_modules"]
    weights = load_file(result.final_dir / "adapter_model.safetensors")
    assert not any("vision_model" in k for k in weights)
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())  # LoRA B starts at zero
    base = load_file(tiny_graft / "model.safetensors")
    moved = [k for k, w in weights.items() if "connector" in k
             and not torch.equal(w.float(), base[k.replace("base_model.model.", "").replace(
                 ".modules_to_save.default", "")].float())]
    assert moved
    assert (tmp_path / "run" / "checkpoint-1" / "vlmgraft_checkpoint.json").exists()
    meta = json.loads((result.final_dir / "vlmgraft_checkpoint.json").read_text())
    assert meta["stage"] == "dpo" and not (result.final_dir / "ref").exists()
    report = merge(MergeOptions(source=str(tmp_path / "run"), out=tmp_path / "merged", dtype="float32"),
                   log=lambda *_: None)
    assert not report["adapter_keys"]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for key, value in base.items():  # the vision tower is exactly the graft's
        if "vision_model" in key:
            assert torch.equal(merged[key].float(), value.float()), key
    from vlmgraft.cli import main

    vqa = _write(pref_dir / "vqa.jsonl", [{"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]}
                                          for r in _trl_rows(2)])
    assert main(["eval", str(tmp_path / "run"), "--data", str(vqa), "--tasks", "vqa", "--limit", "2",
                 "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "results.json").exists()


def test_a_batch_mixing_image_and_text_only_pairs_runs_through_the_model(tiny_graft, pref_dir):
    from transformers import AutoModelForImageTextToText

    processor = AutoProcessor.from_pretrained(tiny_graft)
    text_only = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Bye."}
    rows, _ = read_preferences(_write(pref_dir / "mixed.jsonl", [_trl_rows(1)[0], text_only]))
    batch = PreferenceCollator(processor)(list(as_dataset(rows)))
    assert batch["pixel_attention_mask"].flatten(2).any(-1).sum(1).tolist()[1] == 0  # the text-only pair's row
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_a_killed_dpo_run_resumes_from_its_checkpoint(tiny_graft, pref_dir, tmp_path):
    from transformers import TrainerCallback

    from vlmgraft.train.run import train

    class StopAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt("simulated kill")

    data = _write(pref_dir / "resume.jsonl", _trl_rows(4))
    config = TrainConfig(model=str(tiny_graft), data=str(data), output_dir=str(tmp_path / "run"), stage="dpo",
                         report_to=["none"], max_steps=2, save_steps=1, logging_steps=1,
                         per_device_train_batch_size=2, seed=3)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=(StopAfterSave(),), echo=lambda *_: None)
    assert (tmp_path / "run" / "checkpoint-1").is_dir() and not (tmp_path / "run" / "final").exists()
    messages = []
    train(config, echo=messages.append)
    assert any("resuming from" in m and "checkpoint-1" in m for m in messages)
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
