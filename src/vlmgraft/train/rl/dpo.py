"""`stage: dpo`: TRL's DPOTrainer on image preference pairs, with the graft's stage preset and optimiser groups.

The reference policy is the model with its adapter disabled (the graft as loaded), so no second copy is held.
`max_length` defaults to no limit instead of TRL's 1024, which would cut a ~1100-token image prompt and fail on a
count mismatch; a limit set in `dpo:` only ever shortens completions (`PreferenceCollator`).
"""

from __future__ import annotations

from trl import DPOConfig, DPOTrainer

from vlmgraft.train.config import TrainConfig
from vlmgraft.train.rl.collate import PreferenceCollator
from vlmgraft.train.rl.common import drop_reference_adapter, trl_config
from vlmgraft.train.rl.data import as_dataset, read_preferences
from vlmgraft.train.stages import GroupOptimizer


class GraftDPOTrainer(GroupOptimizer, DPOTrainer):
    def __init__(self, *args, family, graft_config: TrainConfig, **kwargs):
        self.family, self.graft_config = family, graft_config
        super().__init__(*args, **kwargs)
        drop_reference_adapter(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not inputs:  # every pair of this batch had an unreadable image: a step that changes nothing
            loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (loss, {}) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def dpo_args(config: TrainConfig, has_eval: bool) -> DPOConfig:
    return trl_config(DPOConfig, config, "dpo", has_eval, max_length=None, remove_unused_columns=False,
                      precompute_ref_log_probs=False, label_names=[])


def build_dpo(config: TrainConfig, model, processor, family, callbacks: list):
    """(trainer, train rows' skip tally, collator stats)."""
    rows, skips = read_preferences(config.data)
    eval_rows = read_preferences(config.eval_data, skips)[0] if config.eval_data else None
    args = dpo_args(config, has_eval=eval_rows is not None)
    collator = PreferenceCollator(processor, max_length=args.max_length,
                                  enable_thinking=config.data_settings.enable_thinking)
    trainer = GraftDPOTrainer(
        model=model, args=args, data_collator=collator, train_dataset=as_dataset(rows),
        eval_dataset=as_dataset(eval_rows) if eval_rows else None, processing_class=processor,
        callbacks=callbacks, family=family, graft_config=config)
    return trainer, skips, collator.stats
