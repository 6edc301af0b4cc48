"""Reading a `TrainConfig` from a YAML file and command-line overrides, through transformers' `HfArgumentParser`.

`vlmgraft train run.yaml --learning-rate 2e-4 --lora.r 32 --save_strategy epoch`: every `--key value` after the
YAML path overrides that key, in dashed or underscored spelling; a dotted key sets a key of a section (`lora`,
`learning_rates`, `data_settings`, `dpo`, `grpo`, `chord`). Values are typed by the parser of the dataclass that owns
the key (TrainConfig, LoraSettings, ..., TRL's DPOConfig/GRPOConfig, ChordSettings), so any TrainingArguments key
works without code here, and an unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Sequence
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from vlmgraft.errors import VlmgraftError
from vlmgraft.train.config import NESTED, POST_TRAINING, TrainConfig

SECTIONS = (*NESTED, *POST_TRAINING)
_UNSET = object()  # the parsers' default: tells the keys given from those left out
# What the keys of each section are, for the error that names an unknown one.
_SECTION_KINDS = {"dpo": "a field of TRL's DPOConfig", "grpo": "`rewards` or a field of TRL's GRPOConfig",
                  "chord": "a CHORD setting (GRPO settings go in the 'grpo' section)"}


class KeyParser(HfArgumentParser):
    """HfArgumentParser over dataclasses that returns the keys given (typed) and raises where argparse would exit."""

    def __init__(self, types: tuple[type, ...], section: str = ""):
        super().__init__(types, allow_abbrev=False, add_help=False)
        self.section = section
        self.names = list(dict.fromkeys(f.name for t in types for f in dataclasses.fields(t) if f.init))
        self.set_defaults(**dict.fromkeys(self.names, _UNSET))

    def error(self, message):
        raise VlmgraftError(f"config section {self.section!r}: {message}" if self.section else message)

    def unknown(self, key: str) -> VlmgraftError:
        close = difflib.get_close_matches(key, self.names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        if self.section:
            kind = _SECTION_KINDS.get(self.section, f"a {self.section} setting")
            return VlmgraftError(f"config key '{self.section}.{key}' is not {kind}{hint}")
        return VlmgraftError(f"unknown config key {key!r}{hint}")

    def given(self, tokens: Sequence[str]) -> dict:
        namespace, rest = self.parse_known_args(list(tokens))
        for token in rest:
            if token.startswith("-"):
                raise self.unknown(token.lstrip("-").partition("=")[0].replace("-", "_"))
        if rest:
            raise VlmgraftError(f"unexpected argument {rest[0]!r}: overrides look like --key value")
        return {k: v for k, v in vars(namespace).items() if v is not _UNSET}


@functools.cache
def parser_for(section: str = "") -> KeyParser:
    """The parser of the top-level keys ("") or of one section's keys."""
    if not section:
        return KeyParser((TrainConfig,))
    if section in NESTED:
        return KeyParser((NESTED[section],), section)
    if section == "dpo":
        from trl import DPOConfig

        return KeyParser((DPOConfig,), section)
    if section == "grpo":
        from trl import GRPOConfig

        from vlmgraft.train.rl.grpo import RewardSettings

        return KeyParser((GRPOConfig, RewardSettings), section)
    if section == "chord":
        from vlmgraft.train.rl.chord import ChordSettings

        return KeyParser((ChordSettings,), section)
    close = difflib.get_close_matches(section, SECTIONS, n=2)
    raise VlmgraftError(f"unknown config section {section!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                    else f"; sections: {', '.join(SECTIONS)}"))


def typed_values(mapping: dict, section: str = "") -> dict:
    """A YAML-style mapping with its keys checked and its scalar values typed as the owning field wants them
    (`learning_rate: 2e-4`, which YAML reads as text, becomes a float)."""
    parser = parser_for(section)
    out: dict = {}
    for raw, value in mapping.items():
        key = str(raw).replace("-", "_")
        if key not in parser.names:
            raise parser.unknown(key)
        if not section and key in SECTIONS:
            if value is not None and not isinstance(value, dict):
                raise VlmgraftError(f"config key {key!r} must be a mapping of its settings")
            out[key] = typed_values(value or {}, key)
        elif isinstance(value, (str, int, float, bool)):
            out.update(parser.given([f"--{key}={value}"]))
        else:
            out[key] = value
    return out


def _cli_values(args: Sequence[str]) -> dict:
    """`--a 1 --b.c 2` → top-level keys typed by TrainConfig's parser, dotted ones by their section's."""
    top: list[str] = []
    sections: dict[str, list[str]] = {}
    current = top
    for token in args:
        if token.startswith("--"):
            name, _, rest = token[2:].partition(".")
            if rest and "=" not in name:
                current = sections.setdefault(name.replace("-", "_"), [])
                current.append("--" + rest)
                continue
            current = top
        current.append(token)
    values = parser_for().given(top)
    for key in SECTIONS:
        if key in values:
            raise VlmgraftError(f"config key {key!r} is a section: set its keys as --{key}.KEY VALUE")
    for name, tokens in sections.items():
        values[name] = parser_for(name).given(tokens)
    return values


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = {**merged.get(key, {}), **value} if key in SECTIONS else value
    return merged


def read_yaml(path: str | Path) -> dict:
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
        return typed_values(mapping)
    except VlmgraftError as err:
        raise VlmgraftError(f"{path}: {err}") from err


def load_config(path: str | Path | None = None, args: Sequence[str] = (), **values) -> TrainConfig:
    """The config of a YAML file (optional), then `values` (YAML-style keys), then command-line `args`."""
    merged = read_yaml(path) if path is not None else {}
    merged = _merge(_merge(merged, typed_values(values)), _cli_values(args))
    for name in ("model", "data"):
        if not merged.get(name):
            raise VlmgraftError(f"config key {name!r} is required (set it in the YAML or pass --{name})")
    kwargs = {k: NESTED[k](**v) if k in NESTED else v for k, v in merged.items()}
    try:
        return TrainConfig(**kwargs)
    except (TypeError, ValueError, VlmgraftError) as err:  # TrainingArguments' own checks, e.g. save vs eval steps
        raise VlmgraftError(f"{path}: {err}" if path is not None else str(err)) from err
