"""Run by torchrun in tests/test_train_run.py: a tiny align run that records which samples each rank collated and
which image path its steps took."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlmgraft.train.image_inputs as image_inputs  # noqa: E402
import vlmgraft.train.run as run  # noqa: E402
from vlmgraft.train.loading import load_config  # noqa: E402


def main() -> None:
    record_dir = sys.argv[1]
    config = load_config(None, sys.argv[2:])
    make_collator = run._collator

    def recording_collator(processor, cfg):
        collator = make_collator(processor, cfg)

        def collate(samples):
            rank = os.environ.get("RANK", "0")
            with open(os.path.join(record_dir, f"rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps([s.origin for s in samples if s is not None]) + "\n")
            return collator(samples)

        collate.stats = collator.stats
        collate.to_device = collator.to_device
        return collate

    run._collator = recording_collator
    place = image_inputs.images_into_embeddings

    def recording_place(*args, **kwargs):  # which image path each rank's steps took
        embeds = place(*args, **kwargs)
        with open(os.path.join(record_dir, f"placed{os.environ.get('RANK', '0')}.txt"), "a") as f:
            f.write(("plan" if embeds is not None else "transformers") + "\n")
        return embeds

    image_inputs.images_into_embeddings = recording_place
    result = run.train(config, echo=lambda *_: None)
    if int(os.environ.get("RANK", "0")) == 0:
        losses = [e["loss"] for e in json.loads((result.output_dir / "trainer_state.json").read_text())["log_history"]
                  if "loss" in e] if (result.output_dir / "trainer_state.json").exists() else []
        (result.output_dir / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
