"""`stage: grpo`: TRL's GRPOTrainer on the graft, with the reward functions of `vlmgraft.train.rl.rewards`.

What this module settles so that a graft's rollouts and their scoring agree with how it was trained:
- the chat template renders prompts with `data_settings.enable_thinking`, for generation and for scoring alike, so a
  Qwen3 template's empty `<think>` block sits where the SFT stages put it;
- generation stops at the LLM's end-of-turn token (`<|im_end|>`, `<|eot_id|>`: the closing string the template
  writes after an answer), added to the stop ids when the generation config lacks it;
- rows with images and text-only rows are never mixed in one run (`read_prompts` refuses it);
- `use_vllm` is refused for SmolVLM-family grafts: vLLM's Idefics3 implementation runs a Llama text model only.
Rows' prompts travel as JSON and their images as references; both are decoded when TRL reads a row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from trl import GRPOConfig, GRPOTrainer

from vlmgraft.data.images import DEFAULT_POLICY
from vlmgraft.data.render import ChatRenderer
from vlmgraft.data.source import decode_images
from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import TrainConfig
from vlmgraft.train.rl.common import drop_reference_adapter, trl_config
from vlmgraft.train.rl.data import read_prompts
from vlmgraft.train.rl.rewards import resolve_rewards
from vlmgraft.train.stages import GroupOptimizer


@dataclass
class RewardSettings:
    """The `grpo:` section's keys that are vlmgraft's, beside GRPOConfig's."""

    # built in: accuracy, format, iou, soft_overlong; or your own as module:function
    rewards: list[str] = field(default_factory=list)


OWN_KEYS = tuple(f.name for f in fields(RewardSettings))


def _decode(batch: dict) -> dict:
    """datasets transform: JSON prompts → message lists, image references → PIL images."""
    out = dict(batch)
    out["prompt"] = [json.loads(p) for p in batch["prompt"]]
    out["images"] = [decode_images(refs or [], None, DEFAULT_POLICY, origin)
                     for refs, origin in zip(batch["images"], batch["origin"], strict=True)]
    if not any(out["images"]):
        del out["images"]  # a text-only run: TRL then takes the text path
    return out


def prompt_dataset(rows: list[dict]):
    from datasets import Dataset

    columns: dict[str, list] = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        columns[key] = [r.get(key) for r in rows]
    columns["prompt"] = [json.dumps(p, ensure_ascii=False) for p in columns["prompt"]]
    try:
        dataset = Dataset.from_dict(columns)
    except Exception as err:  # pyarrow's type errors: a column whose values differ in type between rows
        raise VlmgraftError(f"GRPO data: the extra columns {sorted(set(columns) - {'prompt', 'images', 'origin'})} "
                            f"must hold one type per column for the reward functions ({err})") from err
    return dataset.with_transform(_decode)


def end_of_turn_id(processor) -> int | None:
    """The token the chat template closes an answer with, if it is a single token."""
    closing = ChatRenderer(processor).closing.strip()
    if not closing:
        return None
    ids = processor.tokenizer.encode(closing, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def ensure_stop_at_end_of_turn(model, processor) -> list[int]:
    """Put the end-of-turn id into the generation config's eos ids (TRL stops and masks completions at those)."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    turn_end = end_of_turn_id(processor)
    if turn_end is not None and turn_end not in eos:
        eos.append(turn_end)
    config.eos_token_id = eos
    return eos


def check_rollout_backend(args, family) -> None:
    if getattr(args, "use_vllm", False) and family.name == "smolvlm":
        raise VlmgraftError("grpo.use_vllm: vLLM cannot run this graft: its Idefics3/SmolVLM implementation builds a "
                            "Llama text model only, and a graft's LLM (Qwen3 …) is another architecture. Leave "
                            "use_vllm off; rollouts then run through transformers' generate.")


def grpo_args(config: TrainConfig, section: str = "grpo", cls=GRPOConfig):
    return trl_config(cls, config, section, False, OWN_KEYS, remove_unused_columns=False, label_names=[],
                      chat_template_kwargs={"enable_thinking": config.data_settings.enable_thinking})


def rewards_for(config: TrainConfig, section: str, args) -> list:
    names = getattr(config, section).get("rewards") or []
    # `rewards: [format, iou]` in YAML, `--grpo.rewards format,iou` or `--grpo.rewards format iou` from the CLI
    names = [n.strip() for item in ([names] if isinstance(names, str) else names) for n in str(item).split(",")
             if n.strip()]
    return resolve_rewards(names, args.max_completion_length or 256)


class GraftGRPOTrainer(GroupOptimizer, GRPOTrainer):
    def __init__(self, *args, family, graft_config: TrainConfig, **kwargs):
        self.family, self.graft_config = family, graft_config
        super().__init__(*args, **kwargs)
        drop_reference_adapter(self.model)


def build_grpo(config: TrainConfig, model, processor, family, callbacks: list, trainer_cls=GraftGRPOTrainer,
               section: str = "grpo", cls=GRPOConfig, **extra):
    """(trainer, skipped rows, data events)."""
    rows, skips = read_prompts(config.data)
    args = grpo_args(config, section, cls)
    check_rollout_backend(args, family)
    ensure_stop_at_end_of_turn(model, processor)
    trainer = trainer_cls(model=model, reward_funcs=rewards_for(config, section, args), args=args,
                          train_dataset=prompt_dataset(rows), processing_class=processor, callbacks=callbacks,
                          family=family, graft_config=config, **extra)
    return trainer, skips, skips
