"""One post-training run (`stage: dpo`, `grpo`, `chord`), in the same run folder layout as every other stage.

The model is loaded and prepared by the stage machinery (`prepare_model`: the connector + LoRA/DoRA on the LLM by
default, the vision tower frozen, `train_groups` and `lora` overriding it like any preset); TRL's trainer then writes
`checkpoint-N/` with `vlmgraft_checkpoint.json`, resumes from the newest one, and the run ends with `final/` (a PEFT
adapter folder with the processor files) that `vlmgraft merge` and `vlmgraft eval` accept, and `run_summary.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from vlmgraft import hub
from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import family_for
from vlmgraft.train.callbacks import CHECKPOINT_META, CheckpointMetadata
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.stages import prepare_model, trainable_table

STAGES = ("dpo", "grpo", "chord")


def _builder(stage: str):
    if stage == "dpo":
        from vlmgraft.train.rl.dpo import build_dpo

        return build_dpo
    if stage == "grpo":
        from vlmgraft.train.rl.grpo import build_grpo

        return build_grpo
    from vlmgraft.train.rl.chord import build_chord

    return build_chord


def run_post_training(config: TrainConfig, force: bool = False, callbacks: tuple = (), echo=print):
    from vlmgraft.train.run import TrainResult, load_model, resolve_output

    if config.stage not in STAGES:
        raise VlmgraftError(f"stage {config.stage!r} is not a post-training stage ({', '.join(STAGES)})")
    # Post-training batches are padded rows, never packed: SDPA, not the flex attention of packed runs on CUDA.
    config.data_settings.packing = False
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
            "stage": plan.stage, "lora": plan.lora, "config": config.to_dict()}
    trainer, skips, stats = _builder(config.stage)(config, model, processor, family,
                                                   [CheckpointMetadata(meta), *callbacks])
    if skips:
        echo(f"data: {skips.total()} row(s) skipped\n{skips.report()}")
    if config.eval_data and config.stage != "dpo":
        echo(f"note: eval_data is not used by stage {config.stage} (no evaluation during GRPO rollouts); evaluate "
             f"the result with `vlmgraft eval`")
    if resume_from:
        echo(f"resuming from {resume_from}")
    result = trainer.train(resume_from_checkpoint=resume_from)

    final = out / "final"
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        processor.save_pretrained(final)
        (final / CHECKPOINT_META).write_text(json.dumps({**meta, "step": trainer.state.global_step}, indent=2,
                                                        ensure_ascii=False))
        summary = {"metrics": result.metrics, "trainable": counts, "skipped": skips.counts(),
                   "data_events": stats.counts()}
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    return TrainResult(out, final, result.metrics, [], counts)
