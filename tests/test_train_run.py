"""Whole training runs on tiny models: checkpoints for merge, resume with the same data order, two-process DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from transformers import TrainerCallback

from vlmgraft.data.shapes import ShapesWorld
from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import DataSettings, TrainConfig
from vlmgraft.train.run import train
from vlmgraft.train.speed import mark_cuda_graph_step

HELPER = Path(__file__).parent / "helpers" / "ddp_train.py"


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    world = ShapesWorld(image_size=64, seed=1)
    return str(world.write(tmp_path_factory.mktemp("vqa"), "messages", 48, lang="zh", task="colour"))


def _config(model, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(model), data=data, output_dir=str(out), stage="align",  # bf16 default: fp32 on CPU
                  report_to=["none"], learning_rate=5e-3, max_steps=6, save_steps=2, logging_steps=1,
                  per_device_train_batch_size=4, num_sample_images=0, seed=3, data_seed=3,
                  data_settings=DataSettings(num_workers="0", eval_size=0, max_length=256))
    return TrainConfig(**{**values, **overrides})


def _losses(state_file: Path) -> dict[int, float]:
    history = json.loads(state_file.read_text())["log_history"]
    return {e["step"]: e["loss"] for e in history if "loss" in e}


class StopAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_killed_run_resumes_with_the_same_data_order_and_loss_curve(tiny_graft, vqa_data, tmp_path):
    whole = train(_config(tiny_graft, vqa_data, tmp_path / "whole"), echo=lambda *_: None)
    reference = _losses(whole.output_dir / "checkpoint-6" / "trainer_state.json")

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_graft, vqa_data, out), callbacks=(StopAfterSave(4),), echo=lambda *_: None)
    assert (out / "checkpoint-4").is_dir() and not (out / "final").exists()
    messages = []
    train(_config(tiny_graft, vqa_data, out), echo=messages.append)
    assert any("resuming from" in m and "checkpoint-4" in m for m in messages)
    resumed = _losses(out / "checkpoint-6" / "trainer_state.json")
    assert set(resumed) == set(reference)
    for step in (5, 6):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6)
    meta = json.loads((out / "checkpoint-6" / "vlmgraft_checkpoint.json").read_text())
    assert meta["stage"] == "align" and Path(meta["base_model"]) == Path(tiny_graft).resolve()
    assert (out / "final" / "config.json").exists() and (out / "final" / "processor_config.json").exists()


class SeeCheckpointing(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        name = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else \
            "is_gradient_checkpointing"
        self.enabled = getattr(model, name)


def test_gradient_checkpointing_switch_reaches_the_model_without_deprecation_warnings(tiny_graft, vqa_data, tmp_path):
    seen = SeeCheckpointing()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_config(tiny_graft, vqa_data, tmp_path / "ckpt", max_steps=2, save_steps=100, gradient_checkpointing=True),
              callbacks=(seen,), echo=lambda *_: None)
    assert seen.enabled
    assert not [w for w in caught if "checkpointing` is deprecated" in str(w.message)
                and "training_args" in w.filename]


def test_cuda_graph_steps_are_marked_and_accumulate_into_their_own_buffers(tiny_graft, vqa_data, tmp_path,
                                                                           monkeypatch):
    import torch

    def run(name):
        config = _config(tiny_graft, vqa_data, tmp_path / name, max_steps=3, save_steps=3,
                         gradient_accumulation_steps=2)
        train(config, echo=lambda *_: None)
        return _losses(tmp_path / name / "checkpoint-3" / "trainer_state.json")

    plain = run("plain")
    marks, grads_at_mark = [], []

    def spy(model=None):  # on the CPU nothing is replayed: record what each micro-batch starts with
        mark_cuda_graph_step(model)
        if model is not None:
            grads_at_mark.append(all(p.grad is not None for p in model.parameters() if p.requires_grad))

    monkeypatch.setattr(torch._inductor.config.triton, "cudagraphs", False)  # restored after the test
    monkeypatch.setattr("vlmgraft.train.run.cuda_graphs_enabled", lambda *_: True)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr("vlmgraft.train.trainer.mark_cuda_graph_step", spy)
    graphs = run("graphs")
    assert len(marks) == 6  # one per micro-batch: the regions of one micro-batch share a generation of graphs
    assert grads_at_mark == [True] * 6  # gradients land in buffers made outside the graphs' memory
    assert graphs == pytest.approx(plain, rel=1e-6)  # and the run learns exactly as without


def test_finished_run_and_foreign_folder_are_not_overwritten(tiny_graft, vqa_data, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_graft, vqa_data, out, max_steps=1), echo=lambda *_: None)
    with pytest.raises(VlmgraftError, match="finished run"):
        train(_config(tiny_graft, vqa_data, out, max_steps=1), echo=lambda *_: None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(VlmgraftError, match="--force"):
        train(_config(tiny_graft, vqa_data, foreign, max_steps=1), echo=lambda *_: None)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_force_never_deletes_the_model_being_trained(tiny_graft, vqa_data, tmp_path):
    import shutil

    model = tmp_path / "runs" / "graft"
    shutil.copytree(tiny_graft, model)
    files = sorted(p.name for p in model.iterdir())
    for out in (model, model.parent):  # the model's own folder, and a folder holding it
        with pytest.raises(VlmgraftError, match="is or contains the model to train"):
            train(_config(model, vqa_data, out, max_steps=1), force=True, echo=lambda *_: None)
        assert sorted(p.name for p in model.iterdir()) == files


def test_finetune_checkpoint_is_a_peft_adapter_that_merge_folds(tiny_graft, vqa_data, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlmgraft.export.merge import MergeOptions, merge

    config = _config(tiny_graft, vqa_data, tmp_path / "ft", stage="finetune", vision_trainable_layers=1,
                     max_steps=2)
    config.lora.r = 4
    result = train(config, echo=lambda *_: None)
    assert (result.final_dir / "adapter_config.json").exists()
    merged = tmp_path / "merged"
    merge(MergeOptions(source=str(result.output_dir), out=str(merged), dtype="float32"), log=lambda *_: None)
    model = AutoModelForImageTextToText.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_two_cpu_processes_see_different_data_and_match_one_process(tiny_graft, vqa_data, tmp_path):
    common = ["--model", str(tiny_graft), "--data", vqa_data, "--stage", "align", "--bf16", "false",
              "--report-to", "none", "--learning-rate", "5e-3", "--max-steps", "3", "--save-steps", "3",
              "--logging-steps", "1", "--per-device-train-batch-size", "2", "--num-sample-images", "0",
              "--data-settings.num-workers", "0", "--data-settings.eval-size", "0", "--data-settings.packing", "false",
              "--data-settings.max-length", "256", "--seed", "3", "--data-seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = tmp_path / "two"
    two.mkdir()
    with socket.socket() as probe:  # a free loopback port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", port,
                    str(HELPER), str(two), *common, "--output-dir", str(two / "run")],
                   check=True, env=env, timeout=600)
    one = tmp_path / "one"
    one.mkdir()
    subprocess.run([sys.executable, str(HELPER), str(one), *common, "--output-dir", str(one / "run"),
                    "--gradient-accumulation-steps", "2"], check=True, env=env, timeout=600)

    rank0 = [json.loads(line) for line in (two / "rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(line) for line in (two / "rank1.jsonl").read_text().splitlines()]
    # The loaders may collate one batch ahead of the last step; the steps taken are the first three.
    assert len(rank0) >= 3 and len(rank1) >= 3
    rank0, rank1 = rank0[:3], rank1[:3]
    assert not set(sum(rank0, [])) & set(sum(rank1, []))  # the ranks never share a sample
    single = [json.loads(line) for line in (one / "rank0.jsonl").read_text().splitlines()]
    assert [sorted(a + b) for a, b in zip(rank0, rank1, strict=True)] == \
        [sorted(single[2 * i] + single[2 * i + 1]) for i in range(3)]  # same global batches
    for rank in (0, 1):  # the features were placed from the collator's plan, outside DDP's forward
        assert set((two / f"placed{rank}.txt").read_text().split()) == {"plan"}
    two_losses = json.loads((two / "run" / "losses.json").read_text())
    one_losses = json.loads((one / "run" / "losses.json").read_text())
    assert two_losses == pytest.approx(one_losses, rel=1e-4)


def test_evaluation_runs_the_vision_probe_and_answers_fixed_images(tiny_graft, vqa_data, tmp_path):
    config = _config(tiny_graft, vqa_data, tmp_path / "probe", max_steps=2, eval_steps=2, save_steps=2,
                     num_sample_images=2)
    config.data_settings.eval_size = 4
    result = train(config, echo=lambda *_: None)
    assert [step for step, _ in result.vision_gaps] == [2]
    lines = (result.output_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    record = json.loads(lines[0])
    assert record["step"] == 2 and record["reference"] in {"红色", "绿色", "蓝色", "黄色"} and record["question"]
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    assert summary["vision_gaps"] and summary["trainable"]["connector"]["trainable"] > 0
