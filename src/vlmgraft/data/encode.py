"""One Sample → token ids, labels and image tiles, within `max_length` and never cutting through an image.

Text is rendered with the graft's chat template (`render.ChatRenderer`); each image placeholder is expanded to the
processor's own prompt string (SmolVLM: tile markers, fake/global tokens, `image_seq_len` image tokens per tile;
LLaVA and Exaone4.5: as many image tokens as their processor writes for the image) and the whole
text is tokenised once with character offsets, so loss spans map to tokens exactly. The result is identical to
`processor(text=..., images=...)` (checked in the tests).

Overflow, when a sample is longer than `max_length`:
- `skip`: drop the sample;
- `drop_turns`: drop trailing exchanges while more than one is left;
- `fewer_tiles`: re-encode the images with smaller longest edges, then without splitting; then as `drop_turns`.
When one exchange is still too long, the text after the last image is cut at `max_length` if some loss tokens
remain, otherwise the sample is skipped. Every decision is counted in the `stats` Tally with the sample's origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

from vlmgraft.data.render import ChatRenderer
from vlmgraft.data.sample import Sample
from vlmgraft.data.tally import Tally
from vlmgraft.data.tiles import ImageEncoder, ProcessorImages
from vlmgraft.model.images import image_path_for_processor

IGNORE = -100
OVERFLOW = ("drop_turns", "fewer_tiles", "skip")
LOSS_ON = ("assistant", "all")


class UnalignedTurn(ValueError):
    """The chat template changed an assistant turn beyond what `render.ChatRenderer` can follow."""


@dataclass
class Encoded:
    input_ids: np.ndarray  # int64 (L,)
    labels: np.ndarray  # int64 (L,), IGNORE where no loss
    # SmolVLM: (n_tiles, 3, T, T); other families: their pixel inputs per image, in order; None for text-only samples
    tiles: torch.Tensor | list[dict[str, torch.Tensor]] | None
    image_end: int  # tokens up to the end of the last image (0 without images)
    origin: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


class SampleEncoder:
    def __init__(self, processor, max_length: int = 2048, loss_on: str = "assistant", overflow: str = "drop_turns",
                 enable_thinking: bool = False, pixels: str = "processor", pixel_dtype: torch.dtype = torch.float32,
                 stats: Tally | None = None, **template_kwargs):
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r}: expected one of {LOSS_ON}")
        if overflow not in OVERFLOW:
            raise ValueError(f"overflow={overflow!r}: expected one of {OVERFLOW}")
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.max_length, self.loss_on, self.overflow = max_length, loss_on, overflow
        self.renderer = ChatRenderer(processor, enable_thinking=enable_thinking, **template_kwargs)
        self.image_path = image_path_for_processor(processor)
        self.tiled = self.image_path.family.name == "smolvlm"
        # uint8 tiles are SmolVLM's fast path; other families take their processor's pixels.
        self.images = (ImageEncoder(processor.image_processor, pixels, pixel_dtype) if self.tiled
                       else ProcessorImages(processor, self.image_path.pixel_keys, pixel_dtype))
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.stats = stats if stats is not None else Tally("collator")

    # -- one rendering ---------------------------------------------------------------------------------------------
    def encode_once(self, messages: list[dict], images: list, image_options: dict | None = None,
                    origin: str = "", cache: dict | None = None) -> Encoded:
        """Render, expand and tokenise once (no length policy). `cache` keeps tiles across re-encodings."""
        rendered = self.renderer.render(messages, self.loss_on)
        if rendered.unaligned:
            raise UnalignedTurn(f"the chat template rewrote {rendered.unaligned} assistant turn(s) so that the "
                                f"rendered text no longer contains them as written; no loss span could be placed")
        text, spans = rendered.text, rendered.spans
        pieces, image_ranges, shifts, tiles, cursor, length = [], [], [], [], 0, 0
        cache = {} if cache is None else cache
        for n, image in enumerate(images):
            at = text.find(self.image_token, cursor)
            if at < 0:
                raise ValueError(f"the template rendered fewer image placeholders than the {len(images)} images")
            key = (n, tuple(sorted((image_options or {}).items())))
            if key not in cache:
                cache[key] = self.images.encode(image, **(image_options or {}))
            if self.tiled:
                t, rows, cols = cache[key]
                prompt = get_image_prompt_string(rows, cols, self.processor.image_seq_len,  # the processor's own
                                                 fake_token_around_image=self.processor.fake_image_token,
                                                 image_token=self.image_token,
                                                 global_image_token=self.processor.global_image_token)
            else:
                t, count = cache[key]
                prompt = self.image_token * count
            tiles.append(t)
            pieces.append(text[cursor:at])
            length += at - cursor
            image_ranges.append((length, length + len(prompt)))
            shifts.append((at + len(self.image_token), len(prompt) - len(self.image_token)))
            pieces.append(prompt)
            length += len(prompt)
            cursor = at + len(self.image_token)
        if self.image_token in text[cursor:]:
            raise ValueError(f"the template rendered more image placeholders than the {len(images)} images")
        pieces.append(text[cursor:])
        expanded = "".join(pieces)
        encoding = self.tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoding["input_ids"], dtype=np.int64)
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        loss = np.zeros(len(ids), dtype=bool)

        def moved(position: int) -> int:  # a position in the rendered text → the same place after expansion
            return position + sum(d for after_image, d in shifts if after_image <= position)

        for a, b in spans:
            loss |= (starts < moved(b)) & (ends > moved(a))
        image_end = 0
        for a, b in image_ranges:
            inside = (starts >= a) & (ends <= b)
            loss &= ~inside
            if inside.any():
                image_end = max(image_end, int(np.nonzero(inside)[0][-1]) + 1)
        loss &= ids != self.image_token_id
        labels = np.where(loss, ids, IGNORE)
        pixels = (torch.cat(tiles) if self.tiled else tiles) if tiles else None
        return Encoded(ids, labels, pixels, image_end, origin)

    # -- with the length policy ------------------------------------------------------------------------------------
    def encode(self, sample: Sample) -> Encoded | None:
        origin = sample.origin or sample.source or "<sample>"
        if sample.image_parts() != len(sample.images):
            self.stats.add("sample rejected: image parts != images", origin)
            return None
        text_count = sum(p.get("text", "").count(self.image_token) for m in sample.messages
                         if isinstance(m.get("content"), list) for p in m["content"])
        text_count += sum(m["content"].count(self.image_token) for m in sample.messages
                          if isinstance(m["content"], str))
        if text_count:
            self.stats.add("sample rejected: image token string inside text", origin)
            return None
        cache: dict = {}
        try:
            encoded = self.encode_once(sample.messages, sample.images, None, origin, cache)
        except UnalignedTurn as err:
            self.stats.add("sample rejected: chat template rewrote an assistant turn", f"{origin}: {err}")
            return None
        if not (encoded.labels != IGNORE).any():  # e.g. no assistant turn: it would only add a NaN-prone zero
            self.stats.add("sample rejected: no token carries loss", origin)
            return None
        self.stats.add("samples")
        if len(encoded) <= self.max_length:
            return encoded
        if self.overflow == "skip":
            self.stats.add("overflow: skipped", f"{origin} ({len(encoded)} tokens)")
            return None
        messages, images, options = sample.messages, sample.images, None
        if self.overflow == "fewer_tiles" and images:
            for options in self.images.fallbacks():
                encoded = self.encode_once(messages, images, options, origin, cache)
                if len(encoded) <= self.max_length:
                    self.stats.add("overflow: fewer tiles", f"{origin} ({options})")
                    return encoded
        dropped = 0
        while len(encoded) > self.max_length and (cut := _last_exchange_start(messages)) is not None:
            messages = messages[:cut]
            images = images[:sum(1 for m in messages if isinstance(m.get("content"), list)
                                 for p in m["content"] if p.get("type") == "image")]
            encoded = self.encode_once(messages, images, options, origin, cache)
            dropped += 1
        if len(encoded) <= self.max_length:
            self.stats.add("overflow: dropped turns", f"{origin} ({dropped} exchange(s))")
            return encoded
        keep = self.max_length
        if encoded.image_end <= keep and (encoded.labels[:keep] != IGNORE).any():
            self.stats.add("overflow: truncated", f"{origin} ({len(encoded)} → {keep} tokens)")
            return Encoded(encoded.input_ids[:keep], encoded.labels[:keep], encoded.tiles, encoded.image_end, origin)
        self.stats.add("overflow: skipped", f"{origin} ({len(encoded)} tokens)")
        return None


def _last_exchange_start(messages: list[dict]) -> int | None:
    """Index right after the second-to-last assistant turn (so one exchange fewer remains), or None."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return answers[-2] + 1 if len(answers) >= 2 else None
