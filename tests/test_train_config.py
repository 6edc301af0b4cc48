"""The training config is TrainingArguments: its keys reach the Trainer from YAML and the command line, the keys users
already write keep working, and unknown keys are named."""

from __future__ import annotations

import pytest
import yaml
from transformers import TrainingArguments

from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import DataSettings, TrainConfig
from vlmgraft.train.loading import load_config


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text("model: g\ndata: d.jsonl\n" + text)
    return path


def test_plain_training_arguments_keys_work_from_yaml_and_cli(tmp_path):
    config = load_config(_yaml(tmp_path, "lr_scheduler_type: linear\nsave_strategy: epoch\noptim: adafactor\n"),
                         ["--adam-beta2", "0.95", "--max_grad_norm", "0.5"])
    assert isinstance(config, TrainingArguments)  # handed to the Trainer as it is
    assert config.lr_scheduler_type == "linear" and config.save_strategy == "epoch" and config.optim == "adafactor"
    assert config.adam_beta2 == 0.95 and config.max_grad_norm == 0.5
    assert config.eval_strategy == "epoch"  # evaluation follows saving, so the best checkpoint can be kept
    config = load_config(_yaml(tmp_path, ""), ["--lr_scheduler_type", "cosine_with_restarts", "--save-strategy",
                                               "epoch"])
    assert config.lr_scheduler_type == "cosine_with_restarts" and config.save_strategy == "epoch"


def test_training_arguments_key_reaches_the_trainer(tiny_graft, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmgraft.graft.families import SMOLVLM
    from vlmgraft.train.stages import prepare_model
    from vlmgraft.train.trainer import GraftTrainer

    config = load_config(None, ["--model", str(tiny_graft), "--data", "d", "--output-dir", str(tmp_path),
                                "--report-to", "none", "--optim", "sgd", "--lr-scheduler-type", "constant"])
    model, _ = prepare_model(AutoModelForImageTextToText.from_pretrained(tiny_graft), SMOLVLM, config)
    trainer = GraftTrainer(model=model, args=config.for_data(has_eval=False), family=SMOLVLM, graft_config=config)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert type(trainer.optimizer).__name__ == "SGD"
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(config.learning_rate)  # constant: no warm-up


def test_keys_users_already_write_keep_working(tmp_path):
    path = _yaml(tmp_path, "stage: finetune\nlearning_rate: 2e-4\nwarmup_ratio: 0.05\ngradient_checkpointing: true\n"
                           "train_groups: connector,vision\nlora: {r: 8, use_dora: true}\n"
                           "learning_rates: {vision: 2e-5}\ndata_settings: {packing: false, num_workers: 3}\n"
                           "dpo: {beta: 0.3}\nreport_to: [tensorboard]\n")
    config = load_config(path, ["--lora.use-dora", "false", "--data_settings.max_length", "512", "--dpo.beta", "0.2",
                                "--lora.targets", "q_proj", "v_proj", "--vision-trainable-layers", "2"])
    assert config.learning_rate == 2e-4 and config.learning_rates.vision == 2e-5  # YAML reads 2e-4 as text
    assert config.warmup_steps == 0.05 and config.gradient_checkpointing is True
    assert config.train_groups == ["connector", "vision"] and config.vision_trainable_layers == 2
    assert (config.lora.r, config.lora.use_dora, config.lora.targets) == (8, False, ["q_proj", "v_proj"])
    assert config.data_settings.packing is False and config.data_settings.max_length == 512
    assert config.dataloader_num_workers == 3 and config.dpo == {"beta": 0.2}


def test_unknown_keys_are_named_with_a_suggestion(tmp_path):
    with pytest.raises(VlmgraftError, match=r"run.yaml: unknown config key 'lerning_rate' \(did you mean learning_rate"):
        load_config(_yaml(tmp_path, "lerning_rate: 1\n"))
    with pytest.raises(VlmgraftError, match=r"unknown config key 'save_stratgy' \(did you mean save_strategy"):
        load_config(None, ["--model", "g", "--data", "d", "--save-stratgy", "epoch"])
    with pytest.raises(VlmgraftError, match=r"'lora.rank' is not a lora setting"):
        load_config(None, ["--model", "g", "--data", "d", "--lora.rank", "8"])
    with pytest.raises(VlmgraftError, match=r"'dpo.betta' is not a field of TRL's DPOConfig \(did you mean beta"):
        load_config(_yaml(tmp_path, "dpo: {betta: 0.1}\n"))
    with pytest.raises(VlmgraftError, match=r"unknown config section 'lroa' \(did you mean lora"):
        load_config(None, ["--model", "g", "--data", "d", "--lroa.r", "8"])
    with pytest.raises(VlmgraftError, match="save_strategy"):
        load_config(None, ["--model", "g", "--data", "d", "--save-strategy", "sometimes"])


def test_warmup_ratio_is_a_fraction_of_the_training_steps():
    config = TrainConfig(model="m", data="d", warmup_ratio=0.25)
    assert config.get_warmup_steps(40) == 10
    assert TrainConfig(model="m", data="d").get_warmup_steps(40) == 4  # the default: a tenth of the run
    assert TrainConfig(model="m", data="d", warmup_steps=3).get_warmup_steps(40) == 3  # a step count as it is
    with pytest.raises(VlmgraftError, match="warmup_ratio.*warmup_steps"):
        TrainConfig(model="m", data="d", warmup_ratio=1.5)  # not read as 1 step


def test_graft_defaults_differ_from_training_arguments_where_a_graft_run_needs_it():
    config = TrainConfig(model="m", data="d")
    assert config.remove_unused_columns is False and config.logging_nan_inf_filter is False
    assert config.label_names == ["labels"] and config.prediction_loss_only
    assert config.use_cpu and not config.bf16  # this test machine has no GPU: fp32 on the CPU
    plain = config.for_data(has_eval=False)
    assert plain.eval_strategy == "no" and not plain.load_best_model_at_end
    assert config.for_data(has_eval=True).load_best_model_at_end


def test_resolved_config_round_trips_through_run_config_yaml(tmp_path):
    config = load_config(_yaml(tmp_path, "stage: dpo\nlora: {r: 4}\ndpo: {beta: 0.2}\nsave_strategy: epoch\n"))
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), allow_unicode=True, sort_keys=False))
    again = load_config(path)
    assert again.to_dict() == config.to_dict()
    assert again.lora.r == 4 and again.dpo == {"beta": 0.2} and again.save_strategy == "epoch"


def test_loader_workers_follow_data_settings_unless_set():
    config = TrainConfig(model="m", data="d", data_settings=DataSettings(num_workers="3"))
    assert config.dataloader_num_workers == 3 and config.dataloader_persistent_workers
    config.data_settings.num_workers = "0"  # set after construction, as code may: the run reads it as it is then
    args = config.for_data(has_eval=True)
    assert args.dataloader_num_workers == 0 and not args.dataloader_persistent_workers
    assert TrainConfig(model="m", data="d", dataloader_num_workers=2).for_data(True).dataloader_num_workers == 2


def test_post_training_sections_from_the_cli_reach_trl_configs():
    from trl import DPOConfig, GRPOConfig

    from vlmgraft.train.rl.common import trl_config
    from vlmgraft.train.rl.grpo import OWN_KEYS, rewards_for

    config = load_config(None, ["--model", "m", "--data", "d", "--stage", "grpo", "--learning-rate", "3e-5",
                                "--dpo.beta", "0.2", "--grpo.rewards", "format,iou", "--grpo.num-generations", "4",
                                "--grpo.max_completion_length", "32"])
    dpo = trl_config(DPOConfig, config, "dpo", False)
    assert dpo.beta == 0.2 and dpo.learning_rate == 3e-5  # the run's TrainingArguments, then the section
    grpo = trl_config(GRPOConfig, config, "grpo", False, OWN_KEYS)
    assert grpo.num_generations == 4 and grpo.eval_strategy == "no"
    assert [f.__name__ for f in rewards_for(config, "grpo", grpo)] == ["format_reward", "iou_reward"]
