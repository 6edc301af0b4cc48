"""What the post-training stages share: TRL configs built from a vlmgraft config, and the reference adapter.

A TRL config (DPOConfig, GRPOConfig) starts from the very TrainingArguments every other stage trains with, so
`learning_rate`, `max_steps`, `bf16`, checkpoints and logging mean the same thing; the stage's own section (`dpo:`,
`grpo:`) then sets any field of that TRL config, checked and typed by that class's parser (vlmgraft.train.loading).
"""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import TrainConfig


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



def drop_reference_adapter(model) -> None:
    """TRL copies an existing PEFT adapter into a frozen "ref" adapter for the reference policy. The graft's adapter
    is fresh (zero LoRA B, the connector's original copy kept by PEFT), so the adapters-disabled model already is the
    reference, and the copy would only double the adapter's memory and be saved as a second adapter."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config and "ref" in peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")
