"""One post-training run (`stage: dpo`, `grpo`, `chord`), in the same run folder layout as every other stage.

The model is loaded and prepared by the stage machinery (`prepare_model`: the connector + LoRA/DoRA on the LLM by
default, the vision tower frozen, `train_groups` and `lora` overriding it like any preset); TRL's trainer then writes
`checkpoint-N/` with `vlmgraft_checkpoint.json`, resumes from the newest one, and the run ends with `final/` (a PEFT
adapter folder with the processor files) that `vlmgraft merge` and `vlmgraft eval` accept, and `run_summary.json`.
"""

from __future__ import annotations

from vlmgraft.errors import VlmgraftError
from vlmgraft.train.callbacks import CheckpointMetadata
from vlmgraft.train.config import TrainConfig

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
    from vlmgraft.train.run import TrainResult, finish_run, start_run

    if config.stage not in STAGES:
        raise VlmgraftError(f"stage {config.stage!r} is not a post-training stage ({', '.join(STAGES)})")
    # Post-training batches are padded rows, never packed: SDPA, not the flex attention of packed runs on CUDA.
    config.data_settings.packing = False
    run = start_run(config, force, echo)
    trainer, skips, stats = _builder(config.stage)(config, run.model, run.processor, run.family,
                                                   [CheckpointMetadata(run.meta), *callbacks])
    if skips:
        echo(f"data: {skips.total()} row(s) skipped\n{skips.report()}")
    if config.eval_data and config.stage != "dpo":
        echo(f"note: eval_data is not used by stage {config.stage} (no evaluation during GRPO rollouts); evaluate "
             f"the result with `vlmgraft eval`")
    if run.resume_from:
        echo(f"resuming from {run.resume_from}")
    result = trainer.train(resume_from_checkpoint=run.resume_from)
    final = finish_run(trainer, run, {"metrics": result.metrics, "skipped": skips.counts(),
                                      "data_events": stats.counts()})
    return TrainResult(run.out, final, result.metrics, [], run.counts)
