"""One training run: load the graft, prepare its stage, build data, train (resuming automatically), save `final/`.

Run folder layout: `run_config.yaml` (the resolved config), `checkpoint-N/` (Trainer checkpoints with processor
files and `vlmgraft_checkpoint.json`), `final/` (the end of the run: a full stock model folder for align/align-head/
full, a PEFT adapter folder for finetune), `samples.jsonl`, `run_summary.json`, TensorBoard logs under `runs/`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.trainer_utils import get_last_checkpoint

from vlmgraft import hub
from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.build import inside_output
from vlmgraft.graft.families import family_for
from vlmgraft.train.callbacks import CHECKPOINT_META, CheckpointMetadata, SampleAnswers
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.speed import (
    attention_for,
    compile_enabled,
    compile_regions,
    cuda_graphs_enabled,
    fuse_mlp_gelu,
    patchify_with_matmul,
)
from vlmgraft.train.stages import prepare_model, trainable_table
from vlmgraft.train.trainer import GraftTrainer

log = logging.getLogger(__name__)
# Files a run writes before its first checkpoint; a folder holding only these can be restarted safely.
RUN_FILES = {"run_config.yaml", "runs", "samples.jsonl"}


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    metrics: dict
    vision_gaps: list[tuple[int, float]]
    trainable: dict


def resolve_output(config: TrainConfig, force: bool) -> str | None:
    """Decide between a fresh run, a resume from the newest checkpoint, or a refusal."""
    out = Path(config.output_dir)
    if hub.is_local(config.model) and inside_output(out, Path(config.model)):  # --force would delete it
        raise VlmgraftError(f"output_dir {str(out)!r} is or contains the model to train ({config.model}); choose "
                            f"another output_dir")
    if force and out.exists():
        shutil.rmtree(out)
    if not out.exists():
        return None
    if (out / "final").exists():
        raise VlmgraftError(f"run folder {str(out)!r} holds a finished run (final/); pass --force to start over or "
                            f"choose another output_dir")
    last = get_last_checkpoint(str(out))
    if last is None and set(p.name for p in out.iterdir()) - RUN_FILES:
        raise VlmgraftError(f"output_dir {str(out)!r} exists and holds files that are not a vlmgraft run; pass "
                            f"--force to overwrite it")
    return last


def load_model(config: TrainConfig):
    dtype = torch.bfloat16 if config.bf16 else torch.float32  # bf16 only where it trains (TrainConfig)
    attention = attention_for(config.attn_implementation, config.data_settings.packing)
    kwargs = {"dtype": dtype, "attn_implementation": attention}
    if config.quantize_4bit:
        if not torch.cuda.is_available():
            raise VlmgraftError("quantize_4bit (QLoRA) needs a CUDA GPU: bitsandbytes 4-bit weights do not run on "
                                "the CPU. Set quantize_4bit: false, or train on a GPU machine.")
        import importlib.util

        from transformers import BitsAndBytesConfig

        if importlib.util.find_spec("bitsandbytes") is None:
            raise VlmgraftError("quantize_4bit needs bitsandbytes: pip install 'vlmgraft[qlora]'")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=["vision_model", "connector", "lm_head"])
    model = hub.load_model(AutoModelForImageTextToText.from_pretrained, config.model, "model to train", **kwargs)
    processor = hub.load(AutoProcessor.from_pretrained, config.model, "model's processor")
    return model, processor


def _datasets(config: TrainConfig):
    from vlmgraft.data.spec import build_dataset

    settings = config.data_settings
    if config.eval_data:
        train_ds, _ = build_dataset(config.data, seed=config.data_seed, eval_size=0)
        eval_ds, _ = build_dataset(config.eval_data, seed=config.data_seed, eval_size=0)
    else:
        train_ds, eval_ds = build_dataset(config.data, seed=config.data_seed, eval_size=settings.eval_size)
    return train_ds, eval_ds


def _collator(processor, config: TrainConfig):
    from vlmgraft.data.collate import VisionChatCollator

    s = config.data_settings
    cuda = torch.cuda.is_available()
    pixels = s.pixels if s.pixels != "auto" else ("uint8" if cuda else "processor")
    return VisionChatCollator(processor, max_length=s.max_length, loss_on=s.loss_on, overflow=s.overflow,
                              packing=s.packing, enable_thinking=s.enable_thinking, pixels=pixels,
                              pad_to_multiple_of=_pad_multiple(s.pad_to_multiple_of, cuda))


def _pad_multiple(value: str, cuda: bool) -> int:
    if value == "auto":
        return 64 if cuda else 1
    if not value.isdigit() or int(value) < 1:
        raise VlmgraftError(f"config key 'data_settings.pad_to_multiple_of': expected 'auto' or a whole number >= 1, "
                            f"got {value!r}")
    return int(value)


@dataclass
class RunStart:
    """What every stage's run has once its folder is claimed and its model prepared."""

    out: Path
    resume_from: str | None
    model: object
    processor: object
    family: object
    plan: object
    counts: dict
    meta: dict  # written next to every checkpoint and the final model


def start_run(config: TrainConfig, force: bool, echo=print) -> RunStart:
    """Claim (or resume) the run folder, save the resolved config, load and prepare the model, say what trains."""
    resume_from = resolve_output(config, force)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), allow_unicode=True, sort_keys=False))
    model, processor = load_model(config)
    family = family_for(model.config.model_type)
    model, plan = prepare_model(model, family, config)
    table, counts = trainable_table(model, family)
    echo(f"stage {plan.stage}: trains {', '.join(sorted(plan.groups))}"
         + (f" + last {plan.vision_layers} vision layers" if plan.vision_layers else "")
         + (f" + {'DoRA' if config.lora.use_dora else 'LoRA'} r={config.lora.r} on the LLM" if plan.lora else "")
         + f"\n{table}")
    base_model = config.model
    meta = {"base_model": str(Path(base_model).resolve()) if hub.is_local(base_model) else base_model,
            "stage": plan.stage, "lora": plan.lora, "config": config.to_dict(),
            # chat, serve and webui default to the thinking switch the model learnt to answer with
            "enable_thinking": config.data_settings.enable_thinking}
    return RunStart(out, resume_from, model, processor, family, plan, counts, meta)


def finish_run(trainer, run: RunStart, summary: dict) -> Path:
    """Save `final/` (model or adapter, processor, metadata) and `run_summary.json`; the main process writes."""
    final = run.out / "final"
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        run.processor.save_pretrained(final)
        (final / CHECKPOINT_META).write_text(json.dumps({**run.meta, "step": trainer.state.global_step}, indent=2,
                                                        ensure_ascii=False))
        (run.out / "run_summary.json").write_text(json.dumps({**summary, "trainable": run.counts}, indent=2,
                                                             ensure_ascii=False, default=str))
    return final


def train(config: TrainConfig, force: bool = False, callbacks: tuple = (), echo=print) -> TrainResult:
    if config.stage in ("dpo", "grpo", "chord"):  # post-training on TRL's trainers
        from vlmgraft.train.rl.runner import run_post_training

        return run_post_training(config, force, callbacks, echo)
    run = start_run(config, force, echo)
    model, processor, family = run.model, run.processor, run.family
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    if torch.cuda.is_available():
        patchify_with_matmul(model, family)
        fuse_mlp_gelu(model, family)
    compiled = compile_enabled(config.compile)
    graphs = cuda_graphs_enabled(config.cuda_graphs, compiled)
    # Inductor reads this when a region first runs, which is after this point (torch.compile is lazy).
    inductor_config.triton.cudagraphs = graphs
    if compiled:
        echo(f"compiling {compile_regions(model, family)} regions one by one (decoder layers, the frozen vision "
             f"tower whole or its trained layers, the connector; the first steps are slower while they compile)"
             + (", replayed as CUDA graphs" if graphs else ""))

    train_ds, eval_ds = _datasets(config)
    collator = _collator(processor, config)
    args = config.for_data(has_eval=eval_ds is not None and len(eval_ds) > 0)
    echo(f"data: {args.dataloader_num_workers} loader workers (data_settings.num_workers: "
         f"{config.data_settings.num_workers})")
    fixed = [eval_ds[i] for i in range(min(config.num_sample_images, len(eval_ds)))] if eval_ds else []
    sample_set = [s for s in fixed if s is not None]  # a row whose image was unreadable is skipped
    trainer = GraftTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if args.eval_strategy != "no" else None,
        data_collator=collator, processing_class=processor, family=family, graft_config=config,
        callbacks=[CheckpointMetadata(run.meta),
                   SampleAnswers(processor, sample_set, config.sample_every, run.out),
                   *callbacks])
    if run.resume_from:
        echo(f"resuming from {run.resume_from}")
    result = trainer.train(resume_from_checkpoint=run.resume_from)

    skips = getattr(train_ds, "skips", None)
    final = finish_run(trainer, run, {
        "metrics": result.metrics, "vision_gaps": trainer.vision_gaps,
        "data_events": dict(getattr(collator, "stats", {}) or {}), "empty_batches": dict(trainer.empty_batches),
        "skipped": dict(skips) if skips is not None else {}})
    if trainer.is_world_process_zero():
        from vlmgraft.data.report import data_report

        echo(data_report(train_ds, collator))
    return TrainResult(run.out, final, result.metrics, trainer.vision_gaps, run.counts)
