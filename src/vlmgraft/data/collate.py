"""`VisionChatCollator`: a list of Samples → one training batch for a graft of any export family.

Rows are right-padded to the longest in the batch (dynamic padding). With `packing=True` the batch's samples are
packed first-fit-decreasing into as few rows of `max_length` as possible; when some row holds several, each
sample's `position_ids` restart at 0 and no `attention_mask` is returned: transformers
(masking_utils.find_packed_sequence_indices) then builds a block-diagonal causal mask from the position resets, so
no token attends across a sample border (SDPA, eager, flex and flash-attention alike). That detection only runs
when attention_mask is None and there is no KV cache, so run the model with `use_cache=False` (set
`model.config.use_cache = False` and its text_config's) when training packed. The first token of every sample
carries no label, so a packed row never asks one sample to predict the next.

Batch keys: `input_ids`, `labels` (-100 where no loss), `attention_mask` (rows of one sample each) or
`position_ids` (rows of packed samples), `loss_plan` (a `LossPlan`, not a tensor: what the loss would otherwise
read back from the GPU), and when any sample has images: SmolVLM `pixel_values` (B, N, 3, T, T) +
`pixel_attention_mask` (B, N, T, T, bool) with all-zero padding tiles; LLaVA `pixel_values` (images, 3, H, W);
Exaone4.5 `pixel_values` (patches, C·t·p·p) + `image_grid_thw` (images, 3), images in token order.
With `pixels="uint8"`, `pixel_values` is a `UInt8Tiles` holder instead and `to_device` normalises it on the GPU;
a model handed the holder directly fails with a message saying so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from vlmgraft.data.encode import IGNORE, Encoded, SampleEncoder
from vlmgraft.data.sample import Sample
from vlmgraft.data.tally import Tally
from vlmgraft.data.tiles import normalize_tiles


@dataclass(frozen=True)
class LossPlan:
    """What the training step needs to know about a batch, worked out here on the CPU: every value the step reads
    back from the GPU stalls the GPU while Python launches the next kernels (bench/bench_train_run.py --sync-debug
    FILE lists any such wait).

    columns: positions whose next token is labelled in some row (where logits are computed); label_tokens, tokens,
    samples: counts for the loss and the throughput log. Rows are always padded on the right, so with a plan the
    causal mask alone hides the padding. image_positions: flat indices (row * width + column) of the image tokens;
    tile_index: flat indices (row * tiles per row + tile) of the real tiles in `pixel_values`, in order (CPU int64
    tensors; None without images): where vlmgraft.train.image_inputs puts each tile's features."""

    columns: tuple[int, ...]
    label_tokens: int
    tokens: int
    samples: int
    image_positions: torch.Tensor | None = None
    tile_index: torch.Tensor | None = None


class UInt8Tiles:
    """uint8 tiles waiting for `VisionChatCollator.to_device`; stands in `batch["pixel_values"]` in uint8 mode.

    It deliberately is not a tensor: a model handed it directly fails with this class's message instead of silently
    training on unnormalised pixels. It pins and pickles like a tensor, so DataLoader workers and pin_memory work.
    """

    def __init__(self, tiles: torch.Tensor, tile_mask: torch.Tensor):
        self.tiles, self.tile_mask = tiles, tile_mask

    def pin_memory(self) -> UInt8Tiles:
        return UInt8Tiles(self.tiles.pin_memory(), self.tile_mask.pin_memory())

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"pixel_values holds uint8 tiles (pixels='uint8'); pass the batch through "
                             f"VisionChatCollator.to_device(batch, device, dtype) before the model (wanted .{name})")

    def __repr__(self) -> str:
        return f"UInt8Tiles({tuple(self.tiles.shape)})"


class VisionChatCollator:
    """Callable collate_fn: `collator(list[Sample | None]) -> dict[str, Tensor]` (Nones are skipped rows).

    `stats` (a Tally, summed over DataLoader workers) counts samples, rows, tokens and every overflow or rejection.
    A call whose samples are all skipped returns an empty dict; a training loop should skip that step.
    """

    def __init__(self, processor, max_length: int = 2048, loss_on: str = "assistant", overflow: str = "drop_turns",
                 packing: bool = False, enable_thinking: bool = False, pixels: str = "processor",
                 pixel_dtype: torch.dtype = torch.float32, pad_to_multiple_of: int | None = None, **template_kwargs):
        self.stats = Tally("collator")
        self.encoder = SampleEncoder(processor, max_length, loss_on, overflow, enable_thinking, pixels, pixel_dtype,
                                     self.stats, **template_kwargs)
        self.max_length, self.packing, self.pixels = max_length, packing, pixels
        self.pad_to_multiple_of = pad_to_multiple_of
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.tile = getattr(self.encoder.images, "tile", None)  # SmolVLM's tile side (other families: no tiles)

    def encode(self, sample: Sample) -> Encoded | None:
        """One sample → ids, labels and tiles under this collator's policies (None: skipped and counted)."""
        return self.encoder.encode(sample)

    def _encode_counted(self, sample: Sample) -> Encoded | None:
        try:
            return self.encoder.encode(sample)
        except Exception as err:  # e.g. a template that rejects this role order: count it, keep training
            self.stats.add(f"sample rejected: {type(err).__name__}", f"{sample.origin or sample.source}: {err}")
            return None

    def __call__(self, samples: list[Sample | None]) -> dict:
        skipped = sum(1 for s in samples if s is None)
        if skipped:
            self.stats.add("skipped rows reaching the collator", n=skipped)
        encoded = [e for s in samples if s is not None for e in [self._encode_counted(s)] if e is not None]
        if not encoded:
            self.stats.add("empty batches")
            self.stats.flush()
            return {}
        rows = _pack(encoded, self.max_length) if self.packing else [[e] for e in encoded]
        batch = self._assemble(rows)
        plan = batch["loss_plan"]
        self.stats.add("batches")
        self.stats.add("rows", n=len(rows))
        self.stats.add("tokens", n=plan.tokens)
        self.stats.add("loss tokens", n=plan.label_tokens)
        self.stats.add("padding tokens", n=int(batch["input_ids"].numel()) - plan.tokens)
        self.stats.flush()
        return batch

    def _assemble(self, rows: list[list[Encoded]]) -> dict:
        lengths = [sum(len(e) for e in row) for row in rows]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids = np.concatenate([e.input_ids for e in row])
            input_ids[r, : len(ids)] = torch.from_numpy(ids)
            row_labels = np.concatenate([e.labels for e in row])
            row_labels[np.cumsum([0] + [len(e) for e in row[:-1]])] = IGNORE  # nothing of the sample precedes it
            labels[r, : len(ids)] = torch.from_numpy(row_labels)
            attention[r, : len(ids)] = 1
            # each sample restarts at 0; the padding tail is its own segment, so it never joins a sample
            positions[r] = torch.from_numpy(np.concatenate([np.arange(len(e)) for e in row]
                                                           + [np.arange(width - len(ids))]))
        batch = {"input_ids": input_ids, "labels": labels}
        # Rows of one sample each are plain padded rows even when packing: no position resets, so the trainer can
        # give them SDPA's causal kernel instead of flex attention (vlmgraft.train.speed.sdpa_for_unpacked_rows).
        if any(len(row) > 1 for row in rows):
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = attention
        labelled = labels[:, 1:] != IGNORE
        pixels, tile_index = self._pixels(rows)
        image_positions = (input_ids.view(-1) == self.encoder.image_token_id).nonzero().squeeze(1) if pixels else None
        batch["loss_plan"] = LossPlan(columns=tuple(labelled.any(0).nonzero().squeeze(1).tolist()),
                                      label_tokens=int(labelled.sum()), tokens=sum(lengths),
                                      samples=sum(len(row) for row in rows), image_positions=image_positions,
                                      tile_index=tile_index)
        batch.update(pixels)
        return batch

    def _pixels(self, rows: list[list[Encoded]]) -> tuple[dict, torch.Tensor | None]:
        if not self.encoder.tiled:  # LLaVA / Exaone4.5: every image's inputs in token order, as their forward takes
            images = [p for row in rows for e in row if e.tiles is not None for p in e.tiles]
            return (self.encoder.image_path.concat(images) if images else {}), None
        per_row = [[e.tiles for e in row if e.tiles is not None] for row in rows]
        counts = [sum(t.shape[0] for t in tiles) for tiles in per_row]
        if not any(counts):
            return {}, None
        tile_index = torch.tensor([r * max(counts) + i for r, count in enumerate(counts) for i in range(count)])
        tile_mask = torch.zeros((len(rows), max(counts)), dtype=torch.bool)
        for r, count in enumerate(counts):
            tile_mask[r, :count] = True
        if self.pixels == "uint8":
            return {"pixel_values": UInt8Tiles(_uint8_batch(per_row, counts, self.tile), tile_mask)}, tile_index
        first = next(t for tiles in per_row for t in tiles)
        values = torch.zeros((len(rows), max(counts), 3, self.tile, self.tile), dtype=first.dtype)
        for r, tiles in enumerate(per_row):
            if tiles:
                torch.cat(tiles, out=values[r, : counts[r]])
        mask = tile_mask[:, :, None, None].expand(-1, -1, self.tile, self.tile).contiguous()
        return {"pixel_values": values, "pixel_attention_mask": mask}, tile_index

    def to_device(self, batch: dict, device, dtype: torch.dtype | None = None, non_blocking: bool = True,
                  copy_stream: torch.cuda.Stream | None = None, fused: bool = False) -> dict:
        """Move a batch to `device`; uint8 tiles become normalised `pixel_values` (in `dtype`, default float32).
        `copy_stream` (CUDA): copy the tiles on that stream, so the copy (a batch's largest tensor) runs
        beside the kernels already queued instead of after them; the current stream waits for it before normalising.
        `fused`: normalise with one compiled kernel on CUDA (`normalize_tiles`; the trainer passes `compile`)."""
        out = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
        if isinstance(out.get("pixel_values"), UInt8Tiles):
            pending = out["pixel_values"]
            with torch.cuda.stream(copy_stream) if copy_stream is not None else contextlib.nullcontext():
                tiles = pending.tiles.to(device, non_blocking=non_blocking)
                tile_mask = pending.tile_mask.to(device, non_blocking=non_blocking)
            if copy_stream is not None:
                current = torch.cuda.current_stream(tiles.device)
                current.wait_stream(copy_stream)
                for moved in (tiles, tile_mask):  # their memory came from the copy stream's pool
                    moved.record_stream(current)
            images = self.encoder.images
            out["pixel_values"] = normalize_tiles(tiles, tile_mask, images.mean, images.std, dtype or torch.float32,
                                                  fused=fused)
            out["pixel_attention_mask"] = tile_mask[:, :, None, None].expand(-1, -1, self.tile, self.tile).contiguous()
        elif dtype is not None and "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(dtype)
        return out


def _uint8_batch(per_row: list[list[torch.Tensor]], counts: list[int], tile: int) -> torch.Tensor:
    """The rows' uint8 tiles in one (B, N, 3, T, T) tensor, channels-last in memory like the encoder's tiles (so each
    tile is one contiguous copy); only the padding tiles are zeroed (SmolVLM drops all-zero tiles)."""
    values = torch.empty((len(per_row), max(counts), tile, tile, 3), dtype=torch.uint8)
    for r, tiles in enumerate(per_row):
        start = 0
        for t in tiles:
            values[r, start:start + t.shape[0]].copy_(t.permute(0, 2, 3, 1))
            start += t.shape[0]
        values[r, start:].zero_()
    return values.permute(0, 1, 4, 2, 3)


def _pack(encoded: list[Encoded], capacity: int) -> list[list[Encoded]]:
    """First-fit decreasing: longest samples first, each into the first row with room."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for item in sorted(encoded, key=len, reverse=True):
        for r, free in enumerate(room):
            if len(item) <= free:
                rows[r].append(item)
                room[r] -= len(item)
                break
        else:
            rows.append([item])
            room.append(capacity - len(item))
    return rows
