"""Stage presets and what they make trainable: freezing, LoRA/DoRA, per-group learning rates, the parameter table.

All of it derives from the donor family's module groups (`vlmgraft.graft.families`), so a stage means the same
thing for every donor: `align` trains the connector only, `align-head` adds the LM head, `finetune` trains the last
N vision layers + post-layernorm + connector with LoRA/DoRA on the LLM, `full` trains everything; the post-training
stages `dpo`, `grpo` and `chord` train the connector with LoRA/DoRA on the LLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vlmgraft.errors import VlmgraftError
from vlmgraft.graft.families import GROUPS, DonorFamily
from vlmgraft.model.common import unwrap_model
from vlmgraft.train.config import TrainConfig

log = logging.getLogger(__name__)
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class StagePreset:
    groups: frozenset[str]
    vision_layers: int = 0
    lora: bool = False


PRESETS = {
    "align": StagePreset(frozenset({"connector"})),
    "align-head": StagePreset(frozenset({"connector", "lm_head"})),
    "finetune": StagePreset(frozenset({"connector"}), vision_layers=4, lora=True),
    "full": StagePreset(frozenset(GROUPS)),
    # Post-training (vlmgraft.train.rl): the connector + LoRA/DoRA on the LLM, the vision tower frozen.
    "dpo": StagePreset(frozenset({"connector"}), lora=True),
    "grpo": StagePreset(frozenset({"connector"}), lora=True),
    "chord": StagePreset(frozenset({"connector"}), lora=True),
}


@dataclass(frozen=True)
class StagePlan:
    stage: str
    groups: frozenset[str]
    vision_layers: int
    lora: bool


def plan_stage(config: TrainConfig) -> StagePlan:
    if config.stage not in PRESETS:
        raise VlmgraftError(f"stage {config.stage!r} is not one of {', '.join(PRESETS)}")
    preset = PRESETS[config.stage]
    groups = frozenset(config.train_groups) if config.train_groups else preset.groups
    unknown = groups - set(GROUPS)
    if unknown:
        raise VlmgraftError(f"train_groups {sorted(unknown)} are not module groups ({', '.join(GROUPS)})")
    layers = preset.vision_layers if config.vision_trainable_layers is None else config.vision_trainable_layers
    return StagePlan(config.stage, groups, layers, preset.lora)


def strip_peft(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def param_group(family: DonorFamily, name: str) -> str:
    """Module group of a (possibly PEFT-wrapped) parameter name; LoRA weights count as the LLM's."""
    name = strip_peft(name).replace(".modules_to_save.default", "").replace(".original_module", "")
    return family.group_of(name)


def _vision_layer_names(model, family: DonorFamily, last_n: int) -> list[str]:
    """The last `last_n` vision layers whose output reaches the connector (LLaVA may read an earlier layer)."""
    read = family.vision_layers_read(model.config, len(model.get_submodule(family.vision_layers)))
    return [f"{family.vision_layers}.{i}" for i in range(max(0, read - last_n), read)]


def freeze_for_stage(model, family: DonorFamily, plan: StagePlan) -> None:
    """requires_grad by module group (+ last N vision layers and the post-layernorm when asked)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if "lm_head" in plan.groups and tied and "llm" not in plan.groups:
        log.warning("lm_head is tied to the input embeddings in this model: training it also trains the embedding "
                    "matrix, so text-only answers will drift from the base LLM. Train an untied LLM, or use the "
                    "'align' stage to keep the LLM exact.")
    vision_extra = set(_vision_layer_names(model, family, plan.vision_layers)) if plan.vision_layers else set()
    if vision_extra and family.reads_post_norm:
        vision_extra.add(family.vision_post_norm)
    for name, param in model.named_parameters():
        group = family.group_of(name)
        trains = group in plan.groups or any(name.startswith(prefix + ".") for prefix in vision_extra)
        param.requires_grad_(trains)
    if "lm_head" in plan.groups and tied:
        model.get_input_embeddings().weight.requires_grad_(True)


def apply_lora(model, family: DonorFamily, plan: StagePlan, config: TrainConfig):
    """Wrap with PEFT: LoRA/DoRA on the LLM's projections; trainable non-LoRA modules become `modules_to_save`."""
    from peft import LoraConfig, get_peft_model

    for group, instead in (("vision", f"only its last {plan.vision_layers} layers and post-layernorm train "
                                      f"(vision_trainable_layers)"),
                           ("llm", "it trains through its LoRA adapters only")):
        if group in plan.groups:
            log.warning(f"train_groups lists {group!r}, which stage {plan.stage!r} (LoRA) does not train in full: "
                        f"{instead}. Use stage 'full' to train every weight of it.")
    targets = "|".join(config.lora.targets)
    llm_prefix = family.llm.replace(".", r"\.")
    modules_to_save = []
    if "connector" in plan.groups:
        modules_to_save.append(family.connector.split(".", 1)[1])  # "connector": peft matches name suffixes
    if plan.vision_layers:
        modules_to_save += [name.split(".", 1)[1] for name in _vision_layer_names(model, family, plan.vision_layers)]
        if family.reads_post_norm:
            modules_to_save.append(family.vision_post_norm.split(".", 1)[1])
    if "lm_head" in plan.groups:
        modules_to_save.append(family.lm_head)
    lora_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                             target_modules=rf"^{llm_prefix}\..*\.({targets})$", use_dora=config.lora.use_dora,
                             modules_to_save=modules_to_save or None, bias="none")
    return get_peft_model(model, lora_config)


def prepare_model(model, family: DonorFamily, config: TrainConfig):
    """Freeze or wrap the model for its stage; trainable weights are kept in fp32 for stable updates."""
    plan = plan_stage(config)
    if plan.lora:
        for param in model.parameters():
            param.requires_grad_(False)
        model = apply_lora(model, family, plan, config)
    else:
        freeze_for_stage(model, family, plan)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if not any(p.requires_grad for p in model.parameters()):
        raise VlmgraftError(f"stage {plan.stage!r} with train_groups {sorted(plan.groups)} trains nothing")
    return model, plan


def trainable_table(model, family: DonorFamily) -> tuple[str, dict]:
    """Per module group: trainable parameters, their share of the whole model, and total size."""
    counts = {g: [0, 0] for g in GROUPS}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen or ".original_module." in name:
            continue
        seen.add(id(param))
        group = param_group(family, name)
        counts[group][1] += param.numel()
        if param.requires_grad:
            counts[group][0] += param.numel()
    total = sum(c[1] for c in counts.values())
    lines = [f"{'group':<10} {'trainable':>14} {'of group':>14} {'share of model':>15}"]
    for group, (trainable, size) in counts.items():
        lines.append(f"{group:<10} {trainable:>14,} {size:>14,} {100 * trainable / max(total, 1):>14.2f}%")
    trainable_total = sum(c[0] for c in counts.values())
    lines.append(f"{'total':<10} {trainable_total:>14,} {total:>14,} {100 * trainable_total / max(total, 1):>14.2f}%")
    return "\n".join(lines), {g: {"trainable": c[0], "total": c[1]} for g, c in counts.items()}


def optimizer_groups(model, family: DonorFamily, config: TrainConfig, decay_names: set[str]) -> list[dict]:
    """AdamW parameter groups: per module group learning rate, LoRA+ for B matrices, no decay on norms/biases."""
    rates = config.learning_rates
    buckets: dict[tuple[float, float], list] = {}
    trained: set[str] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = param_group(family, name)
        trained.add(group)
        lr = getattr(rates, group) or config.learning_rate
        if ".lora_B." in name:
            lr *= config.lora.loraplus_ratio
        wd = config.weight_decay if name in decay_names else 0.0
        buckets.setdefault((lr, wd), []).append(param)
    _warn_unused_rates(model, rates, trained)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in buckets.items()]


def _warn_unused_rates(model, rates, trained: set[str]) -> None:
    """A group learning rate that no trained parameter takes would otherwise be ignored without a word."""
    for group in GROUPS:
        if getattr(rates, group) is None or group in trained:
            continue
        if group == "lm_head" and getattr(unwrap_model(model).config, "tie_word_embeddings", False):
            log.warning(f"learning_rates.lm_head ({rates.lm_head:g}) is ignored: this model ties lm_head to the input "
                        f"embeddings, so the shared matrix is one parameter of the 'llm' group and trains at "
                        f"learning_rates.llm or learning_rate.")
        else:
            log.warning(f"learning_rates.{group} ({getattr(rates, group):g}) is ignored: no trained parameter belongs "
                        f"to the {group!r} group in this stage.")


class GroupOptimizer:
    """Mixin for any Trainer (ours and TRL's): the optimiser built from `optimizer_groups`, so per-group learning
    rates and LoRA+ hold in every stage."""

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
