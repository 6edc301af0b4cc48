"""GraftTrainer's reliability: empty micro-batches (every sample skipped) in training, evaluation and the probe, a
token-weighted eval loss, and the refusal of DataParallel."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

from vlmgraft.data.collate import VisionChatCollator
from vlmgraft.data.dataset import ListDataset
from vlmgraft.data.sample import Sample
from vlmgraft.data.shapes import ShapesWorld
from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import SMOLVLM
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.run import train
from vlmgraft.train.stages import prepare_model
from vlmgraft.train.trainer import GraftTrainer, label_only_loss

WORLD = ShapesWorld(image_size=64, seed=5)


def _messages_with_bad_rows(folder) -> str:
    """Eight rows: four good, two whose image file is missing (skipped by the reader), and two with an empty answer
    and no image (nothing for the connector to learn from)."""
    rows = []
    for i in range(4):
        WORLD.scene(i).image.save(folder / f"{i}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{i}.png"}, {"type": "text", "text": "colour?"}]},
            {"role": "assistant", "content": "red"}]})
    missing = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "missing.png"}, {"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": "red"}]}
    empty_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    rows = [rows[0], missing, empty_answer, rows[1], missing, empty_answer, rows[2], rows[3]]
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_empty_micro_batches_are_skipped_and_counted_in_train_eval_and_probe(tiny_graft, tmp_path):
    data = _messages_with_bad_rows(tmp_path)
    config = TrainConfig(model=str(tiny_graft), data=data, eval_data=data, output_dir=str(tmp_path / "run"),
                         stage="align", report_to=["none"], learning_rate=5e-3, max_steps=4, save_steps=4,
                         eval_steps=4, logging_steps=1, per_device_train_batch_size=1, per_device_eval_batch_size=1,
                         gradient_accumulation_steps=2, num_sample_images=0, seed=3, data_seed=3)
    config.data_settings.num_workers = 0
    config.data_settings.max_length = 256
    result = train(config, echo=lambda *_: None)  # 4 steps × 2 micro-batches of 1 row: every row once

    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    assert summary["empty_batches"]["train"] == 2  # the two rows with a missing image
    assert summary["empty_batches"]["eval"] == 2 and summary["empty_batches"]["probe"] == 2
    history = json.loads((result.output_dir / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # finite, not NaN
    evaluation = next(e for e in history if "eval_loss" in e)
    assert evaluation["eval_empty_batches"] == 2 and evaluation["eval_loss"] > 0
    assert [step for step, _ in result.vision_gaps] == [4]


def _trainer(tiny_graft, tmp_path, **arguments):
    processor = AutoProcessor.from_pretrained(tiny_graft)
    config = TrainConfig(model="m", data="d", stage="align")
    model, _ = prepare_model(AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32), SMOLVLM,
                             config)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], prediction_loss_only=True,
                             remove_unused_columns=False, label_names=["labels"], **arguments)
    collator = VisionChatCollator(processor, max_length=512)
    return GraftTrainer(model=model, args=args, data_collator=collator, processing_class=processor, family=SMOLVLM,
                        graft_config=config), collator


def test_an_empty_micro_batch_anywhere_in_an_accumulation_changes_nothing(tiny_graft, tmp_path):
    trainer, collator = _trainer(tiny_graft, tmp_path, gradient_accumulation_steps=2)
    real = collator(WORLD.vqa_samples(2, "en", "colour"))
    tokens = real["loss_plan"].label_tokens
    for group in ([real, {}], [{}, real], [real, collator([None])]):
        assert int(trainer._get_num_items_in_batch(group, trainer.args.device)) == tokens
    assert trainer._get_num_items_in_batch([{}, {}], trainer.args.device) is None

    trainer.current_gradient_accumulation_steps = 2
    model = trainer.model
    loss = trainer.training_step(model, {}, num_items_in_batch=None)
    assert float(loss) == 0 and all(p.grad is None for p in model.parameters())
    assert trainer.empty_batches["train"] == 1
    alone = float(label_only_loss(model, real)[0])  # the token mean of the real micro-batch
    loss = trainer.training_step(model, real, trainer._get_num_items_in_batch([{}, real], trainer.args.device))
    assert float(loss) == pytest.approx(alone, rel=1e-5)  # as if the empty one were not there


def _label_token_loss(model, batch) -> tuple[float, int]:
    """Summed full-vocabulary cross-entropy over the labelled next tokens, and their count."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "loss_plan"}, use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    return float(loss), int((targets != -100).sum())


def test_eval_loss_is_weighted_by_label_tokens_like_the_training_loss(tiny_graft, tmp_path):
    trainer, collator = _trainer(tiny_graft, tmp_path, per_device_eval_batch_size=1)
    trainer.probe_batches = 0
    short = WORLD.vqa_samples(1, "en", "colour")[0]
    long = Sample(messages=[short.messages[0], {"role": "assistant", "content": "a red square and a blue circle " * 6}],
                  images=short.images)
    samples = [short, None, long]  # None: a row the reader skipped, an empty batch of its own
    metrics = trainer.evaluate(ListDataset(samples))

    per_batch = [_label_token_loss(trainer.model, collator([s])) for s in (short, long)]
    weighted = sum(loss for loss, _ in per_batch) / sum(count for _, count in per_batch)
    mean_of_means = sum(loss / count for loss, count in per_batch) / len(per_batch)
    assert abs(weighted - mean_of_means) > 1e-3  # the two definitions differ on this data
    assert metrics["eval_loss"] == pytest.approx(weighted, rel=1e-4)
    assert metrics["eval_empty_batches"] == 1


def test_data_parallel_is_refused_with_a_pointer_to_torchrun(tiny_graft, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    args._n_gpu = 2  # what one process sees on a machine with two GPUs and no distributed launch
    processor = AutoProcessor.from_pretrained(tiny_graft)
    model = AutoModelForImageTextToText.from_pretrained(tiny_graft, dtype=torch.float32)
    with pytest.raises(VlmgraftError, match="DataParallel.*torchrun --nproc_per_node 2"):
        GraftTrainer(model=model, args=args, data_collator=VisionChatCollator(processor), family=SMOLVLM,
                     graft_config=TrainConfig(model="m", data="d"))


def test_a_process_with_an_empty_micro_batch_keeps_ddp_in_step(tiny_graft, tmp_path):
    """Two CPU processes (gloo) where one process's micro-batches are empty while the other's are not: the empty one
    must still take part in the gradient all-reduce, and the run must learn as one process over the same batches."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    helper = Path(__file__).parent / "helpers" / "ddp_train.py"
    data = _messages_with_bad_rows(tmp_path)
    common = ["--model", str(tiny_graft), "--data", data, "--stage", "align", "--bf16", "false", "--report-to", "none",
              "--learning-rate", "5e-3", "--max-steps", "2", "--save-steps", "2", "--logging-steps", "1",
              "--per-device-train-batch-size", "1", "--num-sample-images", "0", "--data-settings.num-workers", "0",
              "--data-settings.eval-size", "0", "--data-settings.max-length", "256", "--seed", "3", "--data-seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    runs = {}
    for name, launch, accumulation in [("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                "--master_addr", "127.0.0.1", "--master_port", port], "2"),
                                       ("one", [], "4")]:
        folder = tmp_path / name
        folder.mkdir()
        subprocess.run([sys.executable, *launch, str(helper), str(folder), *common, "--output-dir", str(folder / "run"),
                        "--gradient-accumulation-steps", accumulation], check=True, env=env, timeout=600)
        runs[name] = json.loads((folder / "run" / "losses.json").read_text())
        rank0 = [json.loads(line) for line in (folder / "rank0.jsonl").read_text().splitlines()]
        if name == "two":
            assert [] in rank0[:4]  # this data order gives rank 0 an empty micro-batch within the steps taken
    assert runs["two"] == pytest.approx(runs["one"], rel=1e-4)
