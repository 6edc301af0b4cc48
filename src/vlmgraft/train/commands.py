"""CLI: `vlmgraft train CONFIG.yaml [--force] [--key value ...]`."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    cmd = sub.add_parser(
        "train", help="train a graft in stages (align, align-head, finetune, full; post-training: dpo, grpo, chord)",
        description="Train from a YAML config; any `--key value` after it overrides that key (dotted for nested "
                    "keys: --lora.r 32, --data-settings.packing false), and every transformers TrainingArguments key "
                    "works too (--save-strategy epoch). An interrupted run resumes from its newest checkpoint when "
                    "started again with the same output_dir.")
    cmd.add_argument("config", nargs="?", help="YAML config (examples/qwen3-smvl/*.yaml)")
    cmd.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs overriding the YAML")
    cmd.set_defaults(func=_run)


def _run(args) -> int:
    from vlmgraft.train.loading import load_config
    from vlmgraft.train.run import train

    extra = list(args.overrides)
    force = "--force" in extra
    extra = [a for a in extra if a != "--force"]
    config = load_config(args.config, extra)
    result = train(config, force=force)
    print(f"done: {result.final_dir}")
    return 0
