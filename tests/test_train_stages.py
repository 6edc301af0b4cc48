"""Stages train exactly their module groups; config mapping; label-only loss; the vision probe's noise."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import SMOLVLM
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.loading import load_config
from vlmgraft.train.stages import param_group, prepare_model, trainable_table
from vlmgraft.train.trainer import label_only_loss, noise_like_images


def _batch(processor, colours=("red", "blue")):
    texts, images = [], []
    for colour in colours:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                    {"role": "assistant", "content": colour}]
        texts.append(processor.apply_chat_template(messages))
        images.append([Image.new("RGB", (64, 48), colour)])
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, : labels.shape[1] - 4] = -100  # the answer and end of turn only
    batch["labels"] = labels
    return dict(batch)


def _model(tiny_graft):
    return AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32)


def _one_step(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    loss, _ = label_only_loss(model, batch)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("stage,expected", [
    ("align", {"connector"}),
    ("align-head", {"connector", "lm_head"}),
    ("full", {"vision", "connector", "llm", "lm_head"}),
])
def test_each_preset_trains_exactly_its_groups(tiny_dir, tiny_graft, stage, expected):
    model = _model(tiny_graft)
    model, plan = prepare_model(model, SMOLVLM, TrainConfig(model="m", data="d", stage=stage))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _one_step(model, _batch(AutoProcessor.from_pretrained(tiny_graft)))
    tied = model.config.tie_word_embeddings
    for name, param in model.named_parameters():
        group = param_group(SMOLVLM, name)
        moved = not torch.equal(param, before[name])
        trains = group in expected or (tied and "lm_head" in expected and name.endswith("embed_tokens.weight"))
        assert moved == trains, f"{stage}: {name} ({group}) {'changed' if moved else 'did not change'}"
    head_before = before.get("lm_head.weight", before["model.text_model.embed_tokens.weight"])  # tied: one tensor
    assert (not torch.equal(model.get_output_embeddings().weight, head_before)) == ("lm_head" in expected)


def test_settings_that_would_do_nothing_are_warned_about(tiny_graft, caplog):
    from vlmgraft.train.stages import optimizer_groups

    config = TrainConfig(model="m", data="d", stage="align-head")
    config.learning_rates.lm_head = 1e-3
    model, _ = prepare_model(_model(tiny_graft), SMOLVLM, config)
    assert model.config.tie_word_embeddings  # the fixture's LLM ties lm_head to its embeddings
    with caplog.at_level("WARNING", logger="vlmgraft.train.stages"):
        groups = optimizer_groups(model, SMOLVLM, config, set())
    assert 1e-3 not in {g["lr"] for g in groups}  # the rate is indeed not applied...
    assert any("learning_rates.lm_head" in r.message and "ties lm_head" in r.message for r in caplog.records)

    caplog.clear()
    config = TrainConfig(model="m", data="d", stage="finetune", train_groups=["connector", "vision", "llm"])
    with caplog.at_level("WARNING", logger="vlmgraft.train.stages"):
        prepare_model(_model(tiny_graft), SMOLVLM, config)
    warned = " ".join(r.message for r in caplog.records)
    assert "train_groups lists 'vision'" in warned and "train_groups lists 'llm'" in warned

    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmgraft.train.stages"):  # ...and the defaults warn about nothing
        model, _ = prepare_model(_model(tiny_graft), SMOLVLM, TrainConfig(model="m", data="d", stage="finetune"))
        optimizer_groups(model, SMOLVLM, TrainConfig(model="m", data="d", stage="finetune"), set())
    assert not caplog.records


def test_finetune_trains_lora_last_vision_layers_and_connector_only(tiny_graft):
    model = _model(tiny_graft)
    config = TrainConfig(model="m", data="d", stage="finetune", vision_trainable_layers=1)
    config.lora.r = 4
    model, plan = prepare_model(model, SMOLVLM, config)
    assert plan.lora and plan.vision_layers == 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _one_step(model, _batch(AutoProcessor.from_pretrained(tiny_graft)))
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        allowed = ("lora_" in name or ".connector.modules_to_save." in name
                   or "encoder.layers.1.modules_to_save" in name or "post_layernorm.modules_to_save" in name)
        if moved:
            assert allowed, f"{name} changed but should be frozen"
        if "original_module" in name or name.endswith("encoder.layers.0.mlp.fc1.weight"):
            assert not moved
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and "text_model" in n for n in trainable)
    assert not any("lora_" in n and "vision_model" in n for n in trainable)
    table, counts = trainable_table(model, SMOLVLM)
    assert counts["llm"]["trainable"] > 0 and counts["lm_head"]["trainable"] == 0
    assert "total" in table and "connector" in table


def test_dora_is_used_when_asked(tiny_graft):
    config = TrainConfig(model="m", data="d", stage="finetune")
    config.lora.use_dora = True
    model, _ = prepare_model(_model(tiny_graft), SMOLVLM, config)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_a_stage_that_trains_nothing_is_an_error(tiny_graft):
    config = TrainConfig(model="m", data="d", stage="align", train_groups=["vision"], vision_trainable_layers=0)
    model, _ = prepare_model(_model(tiny_graft), SMOLVLM, config)  # vision alone is fine
    assert any(p.requires_grad for p in model.parameters())
    with pytest.raises(VlmgraftError, match="not one of"):
        prepare_model(_model(tiny_graft), SMOLVLM, TrainConfig(model="m", data="d", stage="warmup"))
    with pytest.raises(VlmgraftError, match="module groups"):
        prepare_model(_model(tiny_graft), SMOLVLM, TrainConfig(model="m", data="d", train_groups=["eyes"]))


def test_label_only_loss_equals_the_full_vocabulary_loss(tiny_graft):
    model = _model(tiny_graft)
    batch = _batch(AutoProcessor.from_pretrained(tiny_graft))
    mine, count = label_only_loss(model, batch)
    reference = model(**batch).loss
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(mine, reference, atol=1e-5)


def test_flops_estimate_is_the_trainers_with_the_parameters_counted_once(tiny_graft, monkeypatch):
    from types import SimpleNamespace

    from transformers import Trainer

    from vlmgraft.train.trainer import GraftTrainer

    model = _model(tiny_graft)
    batch = _batch(AutoProcessor.from_pretrained(tiny_graft))
    expected = Trainer.floating_point_ops(SimpleNamespace(model=model), batch)
    counted = []
    real_count = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda **kw: counted.append(kw) or real_count(**kw))
    trainer = SimpleNamespace(model=model, _parameter_count=None)
    assert expected > 0
    assert [GraftTrainer.floating_point_ops(trainer, batch) for _ in range(3)] == [expected] * 3
    assert counted == [{"exclude_embeddings": True}]
    assert GraftTrainer.floating_point_ops(trainer, {"pixel_values": batch["pixel_values"]}) == 0


def test_noise_images_keep_padding_tiles_zero():
    pixels = torch.randn(2, 3, 3, 8, 8)
    pixels[1, 2] = 0  # a padding tile
    noisy = noise_like_images(pixels)
    assert torch.equal(noisy[1, 2], torch.zeros(3, 8, 8))
    assert not torch.equal(noisy[0], pixels[0]) and noisy.abs().max() <= 1


def test_yaml_maps_onto_dataclasses_and_cli_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: g\ndata: d.jsonl\nstage: finetune\nlearning_rate: 1.0e-4\nlora: {r: 8, use_dora: true}\n"
                    "data_settings: {packing: false}\nreport_to: [tensorboard]\n")
    config = load_config(path, ["--learning-rate", "3e-4", "--lora.r=32", "--data-settings.packing", "true",
                                "--report-to", "none"])
    assert config.stage == "finetune" and config.learning_rate == 3e-4
    assert config.lora.r == 32 and config.lora.use_dora is True and config.data_settings.packing is True
    assert config.report_to == []  # TrainingArguments' spelling of "none"


def test_config_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: g\ndata: d\nlerning_rate: 1\n")
    with pytest.raises(VlmgraftError, match=r"bad.yaml: unknown config key 'lerning_rate'"):
        load_config(path)
    path.write_text("model: g\ndata: d\nmax_steps: many\n")
    with pytest.raises(VlmgraftError, match="max_steps"):
        load_config(path)
    with pytest.raises(VlmgraftError, match="'data' is required"):
        load_config(None, model="g")


def test_loader_workers_auto_fits_the_machine_and_numbers_pass_through(tmp_path, monkeypatch):
    from vlmgraft.train.config import loader_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [loader_workers("auto", cuda=True, cores=n) for n in (16, 64, 4, 2)] == [12, 12, 2, 0]
    assert [loader_workers("auto", cuda=False, cores=n) for n in (2, 8, 64)] == [0, 2, 4]  # the CPU trains
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four GPU processes share the 16 cores
    assert loader_workers("auto", cuda=True, cores=16) == 2
    path = tmp_path / "run.yaml"
    path.write_text("model: g\ndata: d\ndata_settings: {num_workers: 6}\n")
    assert loader_workers(load_config(path).data_settings.num_workers, cuda=True) == 6
    assert loader_workers(0, cuda=True) == 0
    with pytest.raises(VlmgraftError, match="data_settings.num_workers"):
        loader_workers("many", cuda=True)


def test_progress_bar_shows_the_last_loss_and_rates_beside_its_eta():
    from types import SimpleNamespace

    from vlmgraft.train.callbacks import ProgressWithRates

    bar = ProgressWithRates()
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0)
    bar.on_train_begin(None, state, None)
    state.global_step = 5
    bar.on_step_end(None, state, None)
    bar.on_log(None, state, None, logs={"loss": 1.23456, "samples_per_second": 61.9, "tokens_per_second": 87292.4,
                                        "learning_rate": 1e-4})
    postfix = bar.training_bar.postfix
    bar.on_log(None, state, None, logs={"eval_loss": 2.0})  # an eval log leaves the training figures in place
    assert bar.training_bar.postfix == postfix == "loss=1.235, samples/s=61.9, tokens/s=8.729e+04"
    bar.on_train_end(None, state, None)


def test_qlora_on_cpu_is_a_clear_error(tiny_graft):
    from vlmgraft.train.run import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for CPU-only machines")
    with pytest.raises(VlmgraftError, match="CUDA"):
        load_model(TrainConfig(model=str(tiny_graft), data="d", quantize_4bit=True))


def test_shipped_example_configs_load():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "examples" / "qwen3-smvl").glob("*.yaml"))
    assert len(examples) == 6
    stages = {load_config(path).stage for path in examples}
    assert stages == {"align", "finetune", "dpo", "grpo", "chord"}
