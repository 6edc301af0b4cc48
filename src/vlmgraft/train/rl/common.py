"""What the post-training stages share: TRL configs built from a vlmgraft config, and the graft's optimiser groups.

A TRL config (DPOConfig, GRPOConfig) starts from the very TrainingArguments every other stage trains with, so
`learning_rate`, `max_steps`, `bf16`, checkpoints and logging mean the same thing; the stage's own section (`dpo:`,
`grpo:`) then sets any field of that TRL config, checked and typed by that class's parser (vlmgraft.train.loading).
"""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.stages import optimizer_groups


def trl_config(cls, config: TrainConfig, section: str, has_eval: bool, own_keys: tuple[str, ...] = (),
               **defaults):
    """`cls` (a TRL config class) with the run's TrainingArguments, then `defaults`, then the `section` settings
    (minus `own_keys`, which are vlmgraft's, not TRL's)."""
    from vlmgraft.train.loading import typed_values

    base = config.for_data(has_eval)
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values.update(defaults)
    settings = typed_values(getattr(config, section), section)
    values.update({k: v for k, v in settings.items() if k not in own_keys})
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise VlmgraftError(f"config section {section!r}: {err}") from err


class GroupOptimizer:
    """Mixin for a Trainer: per-module-group learning rates and LoRA+ like GraftTrainer (`optimizer_groups`)."""

    family = None
    graft_config: TrainConfig | None = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = optimizer_groups(opt_model, self.family, self.graft_config, decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer


def drop_reference_adapter(model) -> None:
    """TRL copies an existing PEFT adapter into a frozen "ref" adapter for the reference policy. The graft's adapter
    is fresh (zero LoRA B, the connector's original copy kept by PEFT), so the adapters-disabled model already is the
    reference, and the copy would only double the adapter's memory and be saved as a second adapter."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config and "ref" in peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")
