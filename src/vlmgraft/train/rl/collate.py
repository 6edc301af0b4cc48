"""Batches for TRL's DPOTrainer from preference rows, encoded the way every other stage encodes a conversation.

Each pair is rendered as prompt + chosen and prompt + rejected with the graft's chat template (`SampleEncoder`:
the same image expansion, `enable_thinking` and loss spans as SFT, so the empty `<think>` block of a Qwen3 template
sits in the prompt exactly where generation renders it). The completion is the last assistant turn up to and
including its closing token. Image tokens are never cut: every row is checked to hold as many image tokens as its
tiles give features, and a `max_length` shorter than a row's prompt is an error naming the row, not a truncation.

Batch keys, as DPOTrainer reads them: `input_ids`, `attention_mask`, `completion_mask` (chosen rows first, then the
rejected rows), and with images `pixel_values` (2B, N, 3, T, T) + `pixel_attention_mask` with all-zero padding tiles.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from vlmgraft.data.encode import IGNORE, SampleEncoder
from vlmgraft.data.images import DEFAULT_POLICY, ImagePolicy, ImageSkipped
from vlmgraft.data.source import decode_images
from vlmgraft.data.tally import Tally
from vlmgraft.errors import VlmgraftError


def last_turn_mask(labels: np.ndarray) -> np.ndarray:
    """True over the last contiguous run of labelled tokens: the final assistant turn and its closing token."""
    labelled = labels != IGNORE
    mask = np.zeros_like(labelled)
    if not labelled.any():
        return mask
    end = int(np.nonzero(labelled)[0][-1]) + 1
    start = end
    while start > 0 and labelled[start - 1]:
        start -= 1
    mask[start:end] = True
    return mask


class ImageTokenMismatch(VlmgraftError):
    pass


class PreferenceCollator:
    """`collator(list[{"row": json, ...}]) -> batch`; rows whose images cannot be read are skipped and counted."""

    def __init__(self, processor, max_length: int | None = None, enable_thinking: bool = False,
                 policy: ImagePolicy = DEFAULT_POLICY, stats: Tally | None = None):
        self.stats = stats if stats is not None else Tally("collator")
        self.encoder = SampleEncoder(processor, max_length=max_length or 1 << 30, enable_thinking=enable_thinking,
                                     stats=self.stats)
        if not self.encoder.tiled:
            family = self.encoder.image_path.family
            raise VlmgraftError(f"stage dpo batches SmolVLM tiles only; this is a {family.name} graft "
                                f"({family.export_architecture}): train it with align, align-head, finetune or full")
        self.max_length, self.policy = max_length, policy
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.image_seq_len = processor.image_seq_len
        self.tile = self.encoder.images.tile

    def encode(self, messages: list[dict], images: list, origin: str):
        """(input_ids, completion mask, tiles) of one conversation whose last turn is the completion."""
        encoded = self.encoder.encode_once(messages, images, origin=origin)
        mask = last_turn_mask(encoded.labels)
        if not mask.any():
            raise VlmgraftError(f"{origin}: the chat template rendered no answer tokens for the completion")
        tiles = encoded.tiles
        placeholders = int((encoded.input_ids == self.encoder.image_token_id).sum())
        features = 0 if tiles is None else tiles.shape[0] * self.image_seq_len
        if placeholders != features:
            raise ImageTokenMismatch(f"{origin}: {placeholders} image tokens after templating but the images give "
                                     f"{features} features; the row's images and placeholders disagree")
        ids = encoded.input_ids
        if self.max_length is not None and len(ids) > self.max_length:
            first_answer = int(np.nonzero(mask)[0][0])
            if first_answer >= self.max_length or encoded.image_end > self.max_length:
                raise VlmgraftError(f"{origin}: the prompt is {first_answer} tokens with its image tokens, longer "
                                    f"than max_length={self.max_length}; image tokens are never cut: raise "
                                    f"max_length or set it to null (no limit)")
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            self.stats.add("completion truncated at max_length", origin)
        return ids, mask, tiles

    def _pair(self, example: dict):
        row = json.loads(example["row"]) if "row" in example else example
        origin = row.get("origin", "<row>")
        images = decode_images(row.get("images") or [], None, self.policy, origin)
        chosen = self.encode(row["prompt"] + row["chosen"], images, origin)
        rejected = self.encode(row["prompt"] + row["rejected"], images, origin)
        return chosen, rejected

    def __call__(self, examples: list[dict]) -> dict:
        pairs = []
        for example in examples:
            try:
                pairs.append(self._pair(example))
            except ImageSkipped as err:
                self.stats.add(f"image {err.reason}", f"{err.where}" + (f" ({err.detail})" if err.detail else ""))
        self.stats.add("pairs", n=len(pairs))
        self.stats.flush()
        if not pairs:
            return {}
        rows = [p[0] for p in pairs] + [p[1] for p in pairs]
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        completion = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, mask, _) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.from_numpy(ids)
            attention[r, : len(ids)] = 1
            completion[r, : len(ids)] = torch.from_numpy(mask.astype(np.int64))
        batch = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
        batch.update(stack_tiles([tiles for _, _, tiles in rows], self.tile))
        return batch


def stack_tiles(per_row: list[torch.Tensor | None], tile: int) -> dict:
    """Rows' tiles as SmolVLM takes them: (B, N, 3, T, T) with all-zero padding tiles the model drops, and the mask;
    nothing when no row has an image (a text-only batch)."""
    counts = [0 if t is None else t.shape[0] for t in per_row]
    if not any(counts):
        return {}
    first = next(t for t in per_row if t is not None)
    values = torch.zeros((len(per_row), max(counts), 3, tile, tile), dtype=first.dtype)
    mask = torch.zeros((len(per_row), max(counts), tile, tile), dtype=torch.bool)
    for r, tiles in enumerate(per_row):
        if tiles is not None:
            values[r, : counts[r]] = tiles
            mask[r, : counts[r]] = True
    return {"pixel_values": values, "pixel_attention_mask": mask}
