"""Trainer callbacks: checkpoint metadata for `vlmgraft merge`, answers to fixed eval images as training goes, and a
progress bar that carries the latest loss and throughput next to its ETA."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from vlmgraft.data.sample import Sample

log = logging.getLogger(__name__)
CHECKPOINT_META = "vlmgraft_checkpoint.json"


class CheckpointMetadata(TrainerCallback):
    """Writes `vlmgraft_checkpoint.json` (base model, stage, config) into every checkpoint folder."""

    def __init__(self, meta: dict):
        self.meta = meta

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            (folder / CHECKPOINT_META).write_text(json.dumps({**self.meta, "step": state.global_step}, indent=2,
                                                             ensure_ascii=False))


class ProgressWithRates(ProgressCallback):
    """The Trainer's progress bar (steps, elapsed, ETA) with the last logged loss, samples/s and tokens/s as its
    postfix, so the bar alone says how a run goes; the log lines are still printed above it."""

    FIELDS = (("loss", "loss"), ("samples_per_second", "samples/s"), ("tokens_per_second", "tokens/s"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix({name: f"{logs[key]:.4g}" for key, name in self.FIELDS
                                           if isinstance(logs.get(key), (int, float))}, refresh=False)


@torch.no_grad()
def answer_samples(model, processor, samples: list[Sample], max_new_tokens: int = 32) -> list[dict]:
    """Greedy answers through the evaluator's own batched generation, with question and reference."""
    from vlmgraft.eval.generation import answer_samples as generate
    from vlmgraft.eval.generation import split_sample
    from vlmgraft.eval.tasks import question_of
    from vlmgraft.train.speed import settings_for_generation

    was_training = model.training
    model.eval()
    try:
        with settings_for_generation(model):
            answers = generate(model, processor, samples, max_new_tokens=max_new_tokens, desc="sample answers")
    finally:
        model.train(was_training)
    return [{"question": question_of(s), "answer": a, "reference": split_sample(s)[1]}
            for s, a in zip(samples, answers, strict=True)]


class SampleAnswers(TrainerCallback):
    """Every k steps (or at each evaluation), answer a few fixed eval images; log to samples.jsonl and TensorBoard."""

    def __init__(self, processor, samples: list[Sample], every: int, out_dir: Path):
        self.processor = processor
        self.samples = samples
        self.every = every
        self.out_dir = Path(out_dir)
        self._writer = None

    def _run(self, args, state, model):
        if not self.samples or not state.is_world_process_zero:
            return
        results = answer_samples(model, self.processor, self.samples)
        with open(self.out_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            for i, r in enumerate(results):
                f.write(json.dumps({"step": state.global_step, "index": i, **r}, ensure_ascii=False) + "\n")
        for r in results:
            log.info(f"[step {state.global_step}] Q: {r['question']} | A: {r['answer']} | ref: {r['reference']}")
        if "tensorboard" in (args.report_to or []):
            self._tensorboard(args, state, results)

    def _tensorboard(self, args, state, results):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        if self._writer is None:
            self._writer = SummaryWriter(str(self.out_dir / "runs" / "samples"))
        table = "\n".join(f"| {r['question']} | {r['answer']} | {r['reference']} |" for r in results)
        self._writer.add_text("samples", "| question | answer | reference |\n|---|---|---|\n" + table,
                              state.global_step)
        if state.global_step == 0 or not getattr(self, "_images_logged", False):
            import numpy as np

            for i, sample in enumerate(self.samples):
                if sample.images:
                    self._writer.add_image(f"sample_{i}", np.asarray(sample.images[0]), state.global_step,
                                           dataformats="HWC")
            self._images_logged = True
        self._writer.flush()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and model is not None:
            self._run(args, state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not self.every and model is not None:
            self._run(args, state, model)
