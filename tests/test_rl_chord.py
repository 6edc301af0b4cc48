"""`stage: chord`: the μ schedule, the φ weights, the loss composition, and a run that logs μ and both losses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.rl.chord import ChordSettings, chord_mu, combine, sft_loss


def test_mu_warms_up_linearly_then_follows_a_cosine_to_the_valley_and_stays():
    peak, valley, warmup, decay = 0.9, 0.05, 10, 200
    mus = [chord_mu(s, peak, valley, warmup, decay) for s in range(0, 300)]
    assert mus[0] == 0 and mus[5] == pytest.approx(peak / 2) and mus[10] == pytest.approx(peak)
    assert mus[10 + 100] == pytest.approx((peak + valley) / 2)  # half way down the cosine
    assert mus[10 + 50] == pytest.approx(valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a >= b for a, b in zip(mus[10:210], mus[11:211], strict=False))
    assert all(m == pytest.approx(valley) for m in mus[210:])
    assert chord_mu(0, peak, valley, 0, 200) == pytest.approx(peak)  # no warm-up: starts at the peak


def test_phi_weights_are_p_times_one_minus_p_and_carry_no_gradient():
    logps = torch.log(torch.tensor([[0.5, 0.9, 0.2]])).requires_grad_(True)
    mask = torch.tensor([[True, True, False]])
    loss = sft_loss(logps, mask, phi=True)
    loss.backward()
    p = torch.tensor([0.5, 0.9, 0.2])
    assert loss.item() == pytest.approx(float(-(p[:2] * (1 - p[:2]) * p[:2].log()).sum() / 2))
    expected = torch.tensor([[-(0.5 * 0.5) / 2, -(0.9 * 0.1) / 2, 0.0]])  # φ detached: d/dlogp = −φ/N
    assert torch.allclose(logps.grad, expected, atol=1e-6)


def test_sft_loss_without_phi_is_the_mean_over_expert_tokens():
    logps = torch.tensor([[-1.0, -3.0, -100.0], [-2.0, -100.0, -100.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert sft_loss(logps, mask, phi=False).item() == pytest.approx(2.0)


def test_loss_is_mixed_by_mu_with_the_sft_term_divided_by_accumulation():
    grpo = torch.tensor(0.4)  # GRPOTrainer's loss arrives already divided by the accumulation steps
    expert = torch.tensor(2.0)
    assert combine(grpo, expert, 0.25, 4).item() == pytest.approx(0.75 * 0.4 + 0.25 * 2.0 / 4)
    assert combine(grpo, None, 0.0, 4).item() == pytest.approx(0.4)
    assert combine(grpo, expert, 1.0, 1).item() == pytest.approx(2.0)


def test_chord_settings_are_checked():
    config = TrainConfig(model="m", data="d", stage="chord")
    with pytest.raises(VlmgraftError, match="chord.sft_data is required"):
        ChordSettings.from_config(config)
    config.chord = {"sft_data": "x.jsonl", "num_generations": 4}
    with pytest.raises(VlmgraftError, match="chord.num_generations.*'grpo' section"):
        ChordSettings.from_config(config)
    config.chord = {"sft_data": "x.jsonl", "mu_peak": "0.5", "phi": "true", "mu_decay_steps": "20"}
    settings = ChordSettings.from_config(config)
    assert settings.mu_peak == 0.5 and settings.phi is True and settings.mu_decay_steps == 20


def test_chord_run_logs_mu_and_both_losses_and_trains(tiny_graft, tmp_path):
    from safetensors.torch import load_file

    from vlmgraft.data.shapes import ShapesWorld
    from vlmgraft.train.run import train

    expert = ShapesWorld(image_size=48, seed=2).write(tmp_path / "expert", "messages", 4, lang="en", task="colour")
    prompts = tmp_path / "prompts.jsonl"
    with open(expert) as rows, open(prompts, "w") as out:
        for line in rows:
            row = json.loads(line)
            user = row["messages"][0]
            user["content"][0]["image"] = str(expert.parent / user["content"][0]["image"])
            out.write(json.dumps({"messages": [user], "solution": row["messages"][1]["content"]}) + "\n")
    config = TrainConfig(model=str(tiny_graft), data=str(prompts), output_dir=str(tmp_path / "run"), stage="chord",
                         report_to=["none"], learning_rate=5e-2, warmup_ratio=0.0, max_steps=1, save_steps=1,
                         logging_steps=1, per_device_train_batch_size=2, seed=3)
    config.grpo = {"num_generations": 2, "max_completion_length": 4, "rewards": ["accuracy"]}
    config.chord = {"sft_data": str(expert), "mu_peak": 0.9, "mu_valley": 0.05, "mu_decay_steps": 200, "phi": True}
    result = train(config, echo=lambda *_: None)
    log = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"][0]
    assert log["chord/mu"] == pytest.approx(0.9)
    assert log["chord/sft_loss"] > 0 and "chord/grpo_loss" in log
    weights = load_file(result.final_dir / "adapter_model.safetensors")
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())


def test_post_training_examples_make_valid_trl_configs():
    from pathlib import Path

    from trl import DPOConfig, GRPOConfig

    from vlmgraft.train.loading import load_config
    from vlmgraft.train.rl.common import trl_config
    from vlmgraft.train.rl.grpo import OWN_KEYS

    folder = Path(__file__).parents[1] / "examples" / "qwen3-smvl"
    dpo = load_config(folder / "dpo.yaml")
    args = trl_config(DPOConfig, dpo, "dpo", False, max_length=None)
    assert dpo.lora.use_dora and dpo.quantize_4bit and (dpo.lora.r, dpo.lora.alpha, dpo.lora.dropout) == (8, 8, 0.1)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32
    for name in ("grpo", "chord"):
        config = load_config(folder / f"{name}.yaml")
        grpo = trl_config(GRPOConfig, config, "grpo", False, OWN_KEYS)
        assert grpo.generation_batch_size % grpo.num_generations == 0 and config.grpo["rewards"] == ["format", "iou"]
    chord = ChordSettings.from_config(load_config(folder / "chord.yaml"))
    assert (chord.mu_peak, chord.mu_valley, chord.mu_decay_steps) == (0.9, 0.05, 200)
