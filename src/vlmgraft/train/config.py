"""Training configuration: a YAML file mapped onto dataclasses, with command-line overrides of any key.

`vlmgraft train run.yaml --learning-rate 2e-4 --lora.r 32 --max-steps 100`: every `--key value` after the YAML path
overrides that (dotted) key, with hyphens read as underscores and the value coerced to the field's type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
    # DataLoader worker processes; "auto": on CUDA all but two of this process's cores, at most 12 (enough to feed
    # align on a fast GPU, bench/bench_data.py), elsewhere none below 8 cores (the CPU is busy training).
    num_workers: str = "auto"  # or a number
    enable_thinking: bool = False
    # "uint8": workers ship raw tiles and the GPU normalises them (less CPU, 4× less to copy); "processor": the
    # stock image processor in the workers; "auto": uint8 on CUDA, processor elsewhere.
    pixels: str = "auto"
    # Rows are padded up to a multiple of this: fewer distinct batch shapes for the compiled layers, cuDNN's attention
    # plans and the memory allocator to meet; "auto": 64 on CUDA, 1 (no rounding) elsewhere.
    pad_to_multiple_of: str = "auto"  # or a number


@dataclass
class TrainConfig:
    model: str = ""  # a graft folder from `vlmgraft build` (or a merged earlier stage)
    data: str = ""  # a data SPEC (see `vlmgraft data --help`)
    output_dir: str = "runs/vlmgraft"
    stage: str = "align"  # align | align-head | finetune | full | dpo | grpo | chord
    eval_data: str | None = None
    # Which module groups train; empty means the stage's preset.
    train_groups: list[str] = field(default_factory=list)
    vision_trainable_layers: int | None = None  # None: the stage's preset (finetune: 4)
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rates: GroupLearningRates = field(default_factory=GroupLearningRates)
    data_settings: DataSettings = field(default_factory=DataSettings)
    # Optimisation (mapped onto transformers.TrainingArguments).
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 4  # align at real size fits a 24 GB card (bench/bench_train_run.py)
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    bf16: bool = True
    gradient_checkpointing: bool = False
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
    seed: int = 42
    data_seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 200
    save_steps: int = 200
    save_total_limit: int = 2
    sample_every: int = 0  # generate answers for a few eval images every k steps (0: at each eval)
    num_sample_images: int = 4
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    run_name: str | None = None
    vision_gap_warn: float = 0.01  # warn when loss(noise images) - loss(real images) stays below this after warm-up
    deepspeed: str | None = None
    fsdp: str = ""
    fsdp_config: str | None = None
    # Post-training stages (vlmgraft.train.rl): any DPOConfig / GRPOConfig field, plus `rewards` for grpo and chord
    # and CHORD's own settings (sft_data, mu_peak, mu_valley, mu_warmup_steps, mu_decay_steps, phi).
    dpo: dict = field(default_factory=dict)
    grpo: dict = field(default_factory=dict)
    chord: dict = field(default_factory=dict)


def coerce(value, annotation, key: str):
    """Turn a YAML/CLI value into the dataclass field's type (ints, floats, bools, lists, optionals)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [coerce(v, args[0], key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise VlmgraftError(f"config key {key!r}: expected true/false, got {value!r}")
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError) as err:
            raise VlmgraftError(f"config key {key!r}: expected {annotation.__name__}, got {value!r}") from err
    return value


def _apply(obj, mapping: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for raw_key, value in mapping.items():
        key = str(raw_key).replace("-", "_")
        dotted = prefix + key
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise VlmgraftError(f"unknown config key {dotted!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise VlmgraftError(f"config key {dotted!r} must be a mapping")
            _apply(current, value, dotted + ".")
        elif isinstance(current, dict):  # free-form settings (dpo, grpo, chord): keys merge, checked where used
            if not isinstance(value, dict):
                raise VlmgraftError(f"config key {dotted!r} must be a mapping")
            setattr(obj, key, {**current, **{str(k).replace("-", "_"): v for k, v in value.items()}})
        else:
            setattr(obj, key, coerce(value, hints[key], dotted))


def parse_overrides(args: list[str]) -> dict:
    """`--a.b 3 --flag --c=x` → {"a": {"b": "3"}, "flag": True, "c": "x"}."""
    result: dict = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise VlmgraftError(f"unexpected argument {token!r}: overrides look like --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = True
        node = result
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        i += 1
    return result


def load_config(path: str | Path | None, overrides: dict | None = None) -> TrainConfig:
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise VlmgraftError(f"training config {str(path)!r} does not exist")
        try:
            mapping = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise VlmgraftError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(mapping, dict):
            raise VlmgraftError(f"{path}: expected a mapping of config keys at the top level")
        try:
            _apply(config, mapping)
        except VlmgraftError as err:
            raise VlmgraftError(f"{path}: {err}") from err
    _apply(config, overrides or {})
    for name, value in (("model", config.model), ("data", config.data)):
        if not value:
            raise VlmgraftError(f"config key {name!r} is required (set it in the YAML or pass --{name})")
    return config


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
