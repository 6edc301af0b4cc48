"""Training configuration: `TrainConfig`, transformers' `TrainingArguments` with the graft's own fields.

Like TRL's `SFTConfig`, every `TrainingArguments` key (`lr_scheduler_type`, `save_strategy`, `optim`, ...) is a key
of the config and reaches the Trainer as it is; the fields below are only vlmgraft's: what the run trains
(`model`, `data`, `stage`, module groups, LoRA), how its data is encoded (`data_settings`), its speed switches and
the post-training sections (`dpo`, `grpo`, `chord`). `vlmgraft.train.loading` reads one from YAML and the command
line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SchedulerType

from vlmgraft.errors import VlmgraftError


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Projection names inside the LLM's decoder layers; LoRA never touches the vision tower or connector.
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"])
    use_dora: bool = False
    # LoRA+: the B matrices learn this many times faster than the A matrices (1 = plain LoRA).
    loraplus_ratio: float = 1.0


@dataclass
class GroupLearningRates:
    """Per module group; None means the run's `learning_rate`."""

    vision: float | None = None
    connector: float | None = None
    llm: float | None = None
    lm_head: float | None = None


@dataclass
class DataSettings:
    max_length: int = 2048
    loss_on: str = "assistant"  # or "all"
    overflow: str = "drop_turns"  # or "fewer_tiles", "skip"
    packing: bool = True
    eval_size: int = 64  # held out from `data` when `eval_data` is not given
    # DataLoader worker processes unless `dataloader_num_workers` is set; "auto": on CUDA all but two of this
    # process's cores, at most 12 (enough to feed align on a fast GPU, bench/bench_data.py), elsewhere none below 8
    # cores (the CPU is busy training).
    num_workers: str = "auto"  # or a number
    enable_thinking: bool = False
    # "uint8": workers ship raw tiles and the GPU normalises them (less CPU, 4× less to copy); "processor": the
    # stock image processor in the workers; "auto": uint8 on CUDA, processor elsewhere.
    pixels: str = "auto"
    # Rows are padded up to a multiple of this: fewer distinct batch shapes for the compiled layers, cuDNN's attention
    # plans and the memory allocator to meet; "auto": 64 on CUDA, 1 (no rounding) elsewhere.
    pad_to_multiple_of: str = "auto"  # or a number


# Fields holding a nested dataclass: YAML mappings (`lora: {r: 8}`) and dotted keys (`--lora.r 8`).
NESTED = {"lora": LoraSettings, "learning_rates": GroupLearningRates, "data_settings": DataSettings}
# Post-training sections: only the keys set, checked against TRL's config classes (vlmgraft.train.loading).
POST_TRAINING = ("dpo", "grpo", "chord")


@dataclass
class TrainConfig(TrainingArguments):
    model: str = ""  # a graft folder from `vlmgraft build` (or a merged earlier stage)
    data: str = ""  # a data SPEC (see `vlmgraft data --help`)
    stage: str = "align"  # align | align-head | finetune | full | dpo | grpo | chord
    eval_data: str | None = None
    # Which module groups train; empty means the stage's preset.
    train_groups: list[str] = field(default_factory=list)
    vision_trainable_layers: int | None = None  # None: the stage's preset (finetune: 4)
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rates: GroupLearningRates = field(default_factory=GroupLearningRates)
    data_settings: DataSettings = field(default_factory=DataSettings)
    # A fraction of the training steps spent warming up (the key of transformers 4); sets `warmup_steps`, which
    # transformers 5 reads as a ratio below 1 and as a step count from 1.
    warmup_ratio: float | None = None
    # "auto": flex attention in the LLM for packed batches on CUDA, else SDPA (vlmgraft.train.speed says why);
    # or any transformers implementation name (sdpa, eager, flex_attention, flash_attention_2).
    attn_implementation: str = "auto"
    # Compile each decoder layer, the vision encoder (whole when frozen) and the GPU's tile normalisation (regional
    # torch.compile, vlmgraft.train.speed); None: on CUDA GPUs that inductor supports. Its compilation at the start
    # pays back within the first minutes (bench/bench_train.py --compile-regions).
    compile: bool | None = None
    # Replay the compiled layers as CUDA graphs (needs compile on CUDA): for data whose batches keep one shape only,
    # where it lifts a GPU that waits on Python's kernel launches (vlmgraft.train.speed says when it pays).
    cuda_graphs: bool = False
    quantize_4bit: bool = False  # QLoRA: 4-bit base weights through bitsandbytes (CUDA only)
    sample_every: int = 0  # generate answers for a few eval images every k steps (0: at each eval)
    num_sample_images: int = 4
    vision_gap_warn: float = 0.01  # warn when loss(noise images) - loss(real images) stays below this after warm-up
    # Post-training stages (vlmgraft.train.rl): any DPOConfig / GRPOConfig field, plus `rewards` for grpo and chord
    # and CHORD's own settings (sft_data, mu_peak, mu_valley, mu_warmup_steps, mu_decay_steps, phi).
    dpo: dict = field(default_factory=dict)
    grpo: dict = field(default_factory=dict)
    chord: dict = field(default_factory=dict)

    # TrainingArguments fields whose default differs for a graft run.
    output_dir: str | None = "runs/vlmgraft"
    learning_rate: float = 1e-4
    lr_scheduler_type: SchedulerType | str = "cosine"
    warmup_steps: float = 0.1  # below 1: a ratio of the training steps
    weight_decay: float = 0.01
    per_device_train_batch_size: int = 4  # align at real size fits a 24 GB card (bench/bench_train_run.py)
    num_train_epochs: float = 1.0
    bf16: bool = True  # on CUDA only (__post_init__)
    logging_steps: float = 10
    # None: "epoch" when saving at each epoch, else "steps"; turned off when the run has no eval data.
    eval_strategy: IntervalStrategy | str | None = None
    eval_steps: float | None = None  # None: at every checkpoint (save_steps)
    save_steps: float = 200
    save_total_limit: int | None = 2
    # None: the best checkpoint (lowest eval loss) ends the run wherever evaluation and saving line up.
    load_best_model_at_end: bool | None = None
    data_seed: int | None = 42
    report_to: None | str | list[str] = field(default_factory=lambda: ["tensorboard"])
    # None: `data_settings.num_workers` decides ("auto" unless set).
    dataloader_num_workers: int | None = None
    # The Trainer's NaN/inf filter reads every step's loss back from the GPU (two waits per step) to hide a
    # non-finite loss from the log; a graft run wants that loss seen, and the GPU never waited on.
    logging_nan_inf_filter: bool = False
    remove_unused_columns: bool = False  # the collator reads every field of a sample
    prediction_loss_only: bool = True  # evaluation reports the loss, never gathering full-vocabulary logits
    # The eval loss needs the labels named: the Trainer cannot read them off a PEFT-wrapped model's forward.
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])
    # Every trainable parameter gets a gradient each step: DDP need not search the graph for unused ones.
    ddp_find_unused_parameters: bool | None = False

    def __post_init__(self):
        cuda = torch.cuda.is_available()
        # bf16 weights and autocast on CUDA; elsewhere fp32, since the Trainer autocasts only on CUDA and bf16 frozen
        # parts would then meet the fp32 trainable ones.
        self.bf16 = bool(self.bf16) and cuda and torch.cuda.is_bf16_supported()
        # Without an accelerator, say so: torchrun on CPUs then runs real DDP over gloo instead of N copies.
        self.use_cpu = self.use_cpu or not (cuda or torch.backends.mps.is_available())
        self.dataloader_pin_memory = self.dataloader_pin_memory and cuda  # pinned pages speed up CUDA copies only
        if self.accelerator_config is None:
            # Pinned batches go to the GPU without a host wait, so the next step queues up while this one computes.
            self.accelerator_config = {"non_blocking": cuda}
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise VlmgraftError(f"config key 'warmup_ratio': a fraction of the training steps in [0, 1), got "
                                    f"{self.warmup_ratio}; for a number of steps set warmup_steps")
            self.warmup_steps = self.warmup_ratio
        self._workers_from_settings = self.dataloader_num_workers is None
        if self._workers_from_settings:
            self.dataloader_num_workers = loader_workers(self.data_settings.num_workers, cuda)
            self.dataloader_persistent_workers = self.dataloader_num_workers > 0
        self._checkpointing()
        save = _value(self.save_strategy)
        if self.eval_strategy is None:
            self.eval_strategy = "epoch" if save == "epoch" else "steps"
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        if self.load_best_model_at_end is None:
            evaluate = _value(self.eval_strategy)
            self.load_best_model_at_end = save == "best" or (save == evaluate != "no" and (
                evaluate != "steps" or self.save_steps % self.eval_steps == 0))
        # `--train-groups vision,connector` as well as `--train-groups vision connector`.
        self.train_groups = [g.strip() for item in self.train_groups for g in str(item).split(",") if g.strip()]
        super().__post_init__()

    def _checkpointing(self) -> None:
        """Activation checkpointing, non-reentrant, under the name this transformers uses: 5.24 renamed
        `gradient_checkpointing` (still the YAML key) to `activation_checkpointing` and warns at the old one."""
        name = "activation_checkpointing" if "activation_checkpointing" in self.__dataclass_fields__ \
            else "gradient_checkpointing"
        if name != "gradient_checkpointing" and getattr(self, name) is None and self.gradient_checkpointing is not None:
            setattr(self, name, self.gradient_checkpointing)
            self.gradient_checkpointing = None
        if getattr(self, name) and getattr(self, f"{name}_kwargs") is None:
            setattr(self, f"{name}_kwargs", {"use_reentrant": False})

    def for_data(self, has_eval: bool) -> TrainConfig:
        """These arguments for a run that has eval data or not: without it, no evaluation and no best model; loader
        workers from `data_settings.num_workers` as it is now (code may set it after construction)."""
        changes = {} if has_eval else {"eval_strategy": "no", "load_best_model_at_end": False}
        if self._workers_from_settings:
            changes["dataloader_num_workers"] = None
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict:
        """Plain values (nested settings as mappings), for run_config.yaml and vlmgraft_checkpoint.json."""
        values = super().to_dict()
        for name in NESTED:
            values[name] = dataclasses.asdict(getattr(self, name))
        return values


def _value(strategy) -> str:
    """A strategy field's value, before or after TrainingArguments turns it into an enum."""
    return str(getattr(strategy, "value", strategy))


def loader_workers(value, cuda: bool, cores: int | None = None) -> int:
    """`data_settings.num_workers` resolved: a number as given; "auto" from the cores this process may use (shared
    with the other processes of a torchrun/accelerate launch on this machine)."""
    text = str(value).strip()
    if text == "auto":
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        # Two cores stay with the training process and its pin-memory thread; a CPU run computes on all of them.
        return min(12, max(0, cores - 2)) if cuda else (min(4, cores // 4) if cores >= 8 else 0)
    if not text.isdigit():
        raise VlmgraftError(f"config key 'data_settings.num_workers': expected 'auto' or a whole number >= 0, "
                            f"got {value!r}")
    return int(text)
