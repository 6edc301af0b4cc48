"""The inference engine: vision+text prefill, then text-only decode of many sequences at once in CUDA graphs.

Why not `model.generate()`: it decodes a fixed batch to the end (a request cannot join mid-way) and launches every
kernel from Python each step, which on a launch-bound GPU costs more than the math. transformers' own continuous
batching takes token ids only (no images) and its API still moves between minor versions, so the loop is here:

* prefill: the family's vision path (`vlmgraft.model`) runs eagerly on the new requests' pixels; their features replace the
  image placeholders; the text model then runs the left-padded prompt batch (one CUDA graph per bucketed shape),
  writes the keys/values into each request's slot of a `SlotKVCache` and picks the first token on the device;
* decode: the text model alone, one token per slot, one CUDA graph per (batch bucket, attended-length bucket,
  sampling mode) key; `sync_every` steps are replayed back to back before the host reads the new tokens once
  (to stream them and to notice EOS), and finished slots are refilled at the next boundary (iteration-level batching).

The same code runs eagerly on CPU or MPS (tests compare it with `model.generate()`); graphs are used on CUDA only.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch

from vlmgraft.infer.attention import packed_attention
from vlmgraft.infer.graphs import GraphRunner
from vlmgraft.infer.kv_cache import SlotKVCache
from vlmgraft.infer.model import ModelParts, model_parts
from vlmgraft.infer.sampling import SamplingParams, candidate_count, sample_tokens

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_size: int = 32
    max_seq_len: int = 4096
    sync_every: int = 8
    cuda_graphs: bool | None = None  # None: on CUDA
    bucket_batches: bool | None = None  # pad batches to powers of two (few graph shapes); None: when graphs are on
    compile: bool = False  # torch.compile the decode step (fuses the many small ops of each layer)
    compile_dynamic: bool = True  # one compilation for every batch/length bucket (else one per bucket)
    # Decode batches up to this many rows run the compiled step, larger ones the eager step (both in CUDA graphs):
    # a compiled step copies the cache rows it writes (see SlotKVCache.update), which past a few rows costs more
    # than the fusion saves (bench/bench_serve.py times the compiled and the eager step).
    compile_max_batch: int = 4
    max_prefill_tokens: int = 32768  # padded prompt tokens per prefill forward
    prefill_graph_tokens: int = 8192  # larger prefills are compute-bound: run them eagerly, capture nothing
    vision_batch_tiles: int = 64  # image tiles per vision forward
    prefill_bucket: int = 64  # prompt lengths round up to multiples of this (x2 past 512 tokens, x4 past 2048)
    decode_bucket: int = 256  # attended cache length rounds up to multiples of this


@dataclass(eq=False)  # identity semantics: two requests with the same prompt are still two sequences
class Sequence:
    """One request inside the engine: its prompt, settings and the token ids generated so far."""

    prompt_ids: list[int]
    params: SamplingParams
    pixels: dict[str, torch.Tensor] | None = None  # the family's pixel inputs (`ImagePath.prompt_pixels`)
    id: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or cancelled), "length"
    slot: int = -1
    stored_until: int = 0  # next storage index this sequence writes (host mirror of the device counter)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    sequence: Sequence
    new_ids: list[int]


class PrefillError(RuntimeError):
    """A prefill raised; its requests are back at the head of the queue as they were, to retry or to fail."""

    def __init__(self, batch: list[Sequence], cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.batch = batch


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, eos_token_ids: list[int] | None = None):
        self.config = cfg = config or EngineConfig()
        self.model = model
        self.parts: ModelParts = model_parts(model, tokenizer, eos_token_ids)
        p = self.parts
        self.device, self.dtype = p.device, p.dtype
        self.pad_id = p.pad_token_id
        self.cache = SlotKVCache(p.num_layers, cfg.max_batch_size, p.kv_heads, p.head_dim, cfg.max_seq_len,
                                 self.dtype, self.device)
        self.runner = GraphRunner(self.device, cfg.cuda_graphs if cfg.cuda_graphs is not None else True)
        self.bucketed = cfg.bucket_batches if cfg.bucket_batches is not None else self.runner.enabled
        slots, dev = cfg.max_batch_size, self.device
        # Per-slot decode state (persistent, read and advanced inside the graphs).
        self.tokens = torch.zeros(slots, dtype=torch.long, device=dev)
        self.positions = torch.zeros(slots, dtype=torch.long, device=dev)
        self.write_index = torch.zeros(slots, dtype=torch.long, device=dev)
        self.start = torch.zeros(slots, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(slots, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(slots, dtype=torch.float32, device=dev)
        self.top_k = torch.full((slots,), p.vocab_size, dtype=torch.long, device=dev)
        self.seed = torch.zeros(slots, dtype=torch.long, device=dev)
        self.chunk = torch.zeros(slots, cfg.sync_every, dtype=torch.long, device=dev)
        self._prefill_buffers: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._decode_fn = self._decode_step
        if cfg.compile:
            self._decode_fn = _compiled(self._decode_step, cfg.compile_dynamic)
        self.waiting: list[Sequence] = []
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.alone = 0  # prefills to run one request at a time (set after a batch's prefill failed)
        self._ids = itertools.count(1)
        self.stats = {"prefill_batches": 0, "max_prefill_batch": 0, "decode_steps": 0, "max_decode_batch": 0,
                      "generated_tokens": 0}

    # ------------------------------------------------------------------ requests
    def add(self, prompt_ids: list[int], params: SamplingParams, pixel_values: torch.Tensor | None = None,
            pixel_attention_mask: torch.Tensor | None = None, **pixel_inputs: torch.Tensor) -> Sequence:
        """Queue a prompt (token ids with image placeholders expanded, plus its pixel inputs as the family's
        `prompt_pixels` gives them: SmolVLM's real tiles and mask, LLaVA's images, Exaone's patches and
        image_grid_thw); returns its handle."""
        if params.max_new_tokens > self.prompt_room(len(prompt_ids)):
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} does not "
                             f"fit the engine's max_seq_len {self.config.max_seq_len}")
        given = dict(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask, **pixel_inputs)
        pixels = {k: v for k, v in given.items() if v is not None} if pixel_values is not None else None
        placeholders = sum(1 for t in prompt_ids if t == self.parts.image_token_id)
        needed = self.parts.image_tokens(pixels)
        if placeholders != needed:
            images = 0 if pixel_values is None else pixel_values.shape[0]
            raise ValueError(f"prompt holds {placeholders} image placeholder tokens but its pixel inputs "
                             f"({images} images/tiles/patches) need {needed}")
        seq = Sequence(list(prompt_ids), params, pixels, id=next(self._ids))
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.finished:
            seq.finish_reason = "stop"
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]

    def padded_length(self, prompt_tokens: int) -> int:
        """The prompt length a prefill pads to: few distinct shapes, little padding."""
        base = self.config.prefill_bucket
        step = base if prompt_tokens <= 8 * base else 2 * base if prompt_tokens <= 32 * base else 4 * base
        return _round_up(prompt_tokens, step)

    def prompt_room(self, prompt_tokens: int) -> int:
        """How many new tokens a prompt of this length can still generate."""
        return self.config.max_seq_len - self.padded_length(prompt_tokens)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def warmup(self) -> None:
        """Compile and capture the common decode shapes now (batch 1 and 2, greedy and sampled) with dummy prompts,
        so that the first requests do not wait for it."""
        from vlmgraft.infer.sampling import model_sampling_defaults

        dummy = [self.pad_id] * 8
        usual = model_sampling_defaults(self.model)  # what requests that leave sampling unset will use
        for sampled in (False, True):
            for rows in (1, min(2, self.config.max_batch_size)):
                params = SamplingParams(max_new_tokens=2 * self.config.sync_every, ignore_eos=True, seed=0,
                                        temperature=(usual["temperature"] or 1.0) if sampled else 0.0,
                                        top_k=usual["top_k"] if sampled else 0)
                for _ in range(rows):
                    self.add(dummy, params)
                while self.has_work():
                    self.step()
        for key in ("prefill_batches", "max_prefill_batch", "decode_steps", "max_decode_batch", "generated_tokens"):
            self.stats[key] = 0

    def step(self) -> list[TokenEvent]:
        """One prefill of waiting prompts if a slot is free, else one chunk of `sync_every` decode steps.

        A prefill returns at once so that first tokens reach their clients without waiting for a decode chunk.
        """
        with torch.inference_mode(), packed_attention(self.parts.text_config):
            if self.waiting and len(self.running) < self.config.max_batch_size:
                return self._admit()
            if self.running:
                return self._decode_chunk()
        return []

    # ------------------------------------------------------------------ prefill
    def _admit(self) -> list[TokenEvent]:
        cfg = self.config
        free = [s for s in range(cfg.max_batch_size) if s not in self.running]
        batch: list[Sequence] = []
        for seq in list(self.waiting):
            if len(batch) == (1 if self.alone else len(free)):
                break
            trial = batch + [seq]
            length = self.padded_length(max(len(s.prompt_ids) for s in trial))
            rows = self._prefill_rows(len(trial))
            if batch and (rows * length > cfg.max_prefill_tokens
                          or any(length + s.params.max_new_tokens > cfg.max_seq_len for s in trial)):
                break
            batch = trial
        for seq, slot in zip(batch, free, strict=False):
            self.waiting.remove(seq)
            seq.slot = slot
            self.running[slot] = seq
        self.alone = max(0, self.alone - 1)
        try:
            first = self._prefill(batch)
        except Exception as err:
            for seq in batch:
                del self.running[seq.slot]
            self.waiting[:0] = batch
            raise PrefillError(batch, err) from err
        self.stats["prefill_batches"] += 1
        self.stats["max_prefill_batch"] = max(self.stats["max_prefill_batch"], len(batch))
        return [ev for seq, token in zip(batch, first, strict=True) if (ev := self._accept(seq, [token]))]

    def _prefill_rows(self, n: int) -> int:
        return min(_next_pow2(n), self.config.max_batch_size) if self.bucketed else n

    def _prefill(self, batch: list[Sequence]) -> list[int]:
        cfg, dev = self.config, self.device
        rows = self._prefill_rows(len(batch))
        length = self.padded_length(max(len(s.prompt_ids) for s in batch))
        ids = torch.full((rows, length), self.pad_id, dtype=torch.long)
        starts = torch.full((rows,), length - 1, dtype=torch.long)
        slots = torch.full((rows,), self.cache.scratch_slot, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, length - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            starts[row], slots[row] = length - len(seq.prompt_ids), seq.slot
        buf = self._prefill_buffer(rows, length)
        with torch.no_grad():
            embeds = self.parts.embed(ids.to(dev, non_blocking=True))
            self._insert_image_features(embeds, ids, batch)
            buf["embeds"].copy_(embeds)
        buf["start"].copy_(starts)
        buf["slots"].copy_(slots)
        params = _param_rows(batch, rows, self.parts.vocab_size)
        for name, values in params.items():
            buf[name].copy_(values)
        mode = candidate_count([s.params for s in batch])

        def step() -> None:
            self._prefill_step(buf, rows, length, mode)

        if rows * length <= cfg.prefill_graph_tokens:
            self.runner.run(("prefill", rows, length, mode), step)
        else:
            step()
        # Hand the rows over to their slots for decoding.
        n = len(batch)
        slot_ids = slots[:n].to(dev)
        self.tokens.index_copy_(0, slot_ids, buf["next"][:n])
        self.positions.index_copy_(0, slot_ids, (length - starts[:n]).to(dev))
        self.write_index.index_copy_(0, slot_ids, torch.full((n,), length, dtype=torch.long, device=dev))
        self.start.index_copy_(0, slot_ids, starts[:n].to(dev))
        for name in ("temperature", "top_p", "top_k", "seed"):
            getattr(self, name).index_copy_(0, slot_ids, params[name][:n].to(dev))
        for seq in batch:  # the pixels are consumed (kept until here for a retry): do not hold them any longer
            seq.stored_until = length
            seq.pixels = None
        return buf["next"][:n].tolist()

    def _prefill_buffer(self, rows: int, length: int) -> dict[str, torch.Tensor]:
        key = (rows, length)
        if key not in self._prefill_buffers:
            dev = self.device
            self._prefill_buffers[key] = {
                "embeds": torch.zeros(rows, length, self.parts.hidden_size, dtype=self.dtype, device=dev),
                "start": torch.zeros(rows, dtype=torch.long, device=dev),
                "slots": torch.zeros(rows, dtype=torch.long, device=dev),
                "temperature": torch.zeros(rows, dtype=torch.float32, device=dev),
                "top_p": torch.ones(rows, dtype=torch.float32, device=dev),
                "top_k": torch.ones(rows, dtype=torch.long, device=dev),
                "seed": torch.zeros(rows, dtype=torch.long, device=dev),
                "next": torch.zeros(rows, dtype=torch.long, device=dev),
            }
        return self._prefill_buffers[key]

    def _insert_image_features(self, embeds: torch.Tensor, ids: torch.Tensor, batch: list[Sequence]) -> None:
        with_images = [s for s in batch if s.pixels is not None]
        if not with_images:
            return
        dev = self.device
        # Each request's pixels go to the device as they are (no host-side concatenation of MBs of pixels).
        pixels = self.parts.images.concat([{k: v.to(dev, non_blocking=True) for k, v in s.pixels.items()}
                                           for s in with_images])
        features = self.parts.encode_images(pixels, self.config.vision_batch_tiles)
        # Placeholder positions come from the host copy of the ids: no device sync, rows in batch order like HF.
        where = (ids.view(-1) == self.parts.image_token_id).nonzero().squeeze(-1).to(dev)
        self.parts.images.merge(embeds, where, features, inplace=True)

    def _prefill_step(self, buf: dict[str, torch.Tensor], rows: int, length: int, mode: int | None) -> None:
        dev = self.device
        span = torch.arange(length, device=dev)
        start = buf["start"]
        positions = (span.unsqueeze(0) - start.unsqueeze(1)).clamp(min=0)
        causal = span.unsqueeze(0) <= span.unsqueeze(1)
        visible = causal.unsqueeze(0) & (span.view(1, 1, length) >= start.view(rows, 1, 1))
        mask = _additive(visible, self.dtype).unsqueeze(1)
        hidden = self.parts.text_model(inputs_embeds=buf["embeds"], attention_mask=mask, position_ids=positions,
                                       past_key_values=self.cache.for_prefill(buf["slots"], length),
                                       use_cache=True).last_hidden_state[:, -1]
        logits = self.parts.lm_head(hidden).float()
        counter = length - start
        buf["next"].copy_(self._pick(logits, mode, buf["temperature"], buf["top_p"], buf["top_k"], buf["seed"],
                                     counter))

    # ------------------------------------------------------------------ decode
    def _decode_chunk(self) -> list[TokenEvent]:
        cfg = self.config
        rows = _next_pow2(max(self.running) + 1) if self.bucketed else max(self.running) + 1
        rows = min(rows, cfg.max_batch_size)
        furthest = max(s.stored_until for s in self.running.values()) + cfg.sync_every
        attend = min(_round_up(furthest, cfg.decode_bucket), cfg.max_seq_len)
        mode = candidate_count([s.params for s in self.running.values()])
        key = ("decode", rows, attend, mode)
        step = self._decode_fn if rows <= cfg.compile_max_batch else self._decode_step
        for i in range(cfg.sync_every):
            self.runner.run(key, lambda: step(rows, attend, mode))
            self.chunk[:rows, i].copy_(self.tokens[:rows])
        new = self.chunk[:rows].tolist()
        self.stats["decode_steps"] += cfg.sync_every
        self.stats["max_decode_batch"] = max(self.stats["max_decode_batch"], len(self.running))
        events = []
        for slot, seq in list(self.running.items()):
            seq.stored_until += cfg.sync_every
            if ev := self._accept(seq, new[slot]):
                events.append(ev)
        return events

    def _decode_step(self, rows: int, attend: int, mode: int | None) -> None:
        tokens, positions = self.tokens[:rows], self.positions[:rows]
        write, start = self.write_index[:rows], self.start[:rows]
        span = torch.arange(attend, device=self.device).unsqueeze(0)
        mask = _additive((span >= start.unsqueeze(1)) & (span <= write.unsqueeze(1)), self.dtype).view(rows, 1, 1,
                                                                                                        attend)
        hidden = self.parts.text_model(input_ids=tokens.unsqueeze(1), attention_mask=mask,
                                       position_ids=positions.unsqueeze(1),
                                       past_key_values=self.cache.for_decode(write, rows, attend),
                                       use_cache=True).last_hidden_state[:, -1]
        logits = self.parts.lm_head(hidden).float()
        chosen = self._pick(logits, mode, self.temperature[:rows], self.top_p[:rows], self.top_k[:rows],
                            self.seed[:rows], positions + 1)
        tokens.copy_(chosen)
        positions.add_(1)
        write.copy_((write + 1).clamp_(max=self.cache.max_len - 1))

    @staticmethod
    def _pick(logits, mode: int | None, temperature, top_p, top_k, seed, counter) -> torch.Tensor:
        """mode: None greedy batch, 0 sample over the sorted vocabulary, K sample among the top K."""
        if mode is None:
            return logits.argmax(dim=-1)
        return sample_tokens(logits, temperature, top_p, top_k, seed, counter, candidates=mode)

    # ------------------------------------------------------------------ bookkeeping
    def _accept(self, seq: Sequence, tokens: list[int]) -> TokenEvent | None:
        """Append new tokens to a running sequence, stopping at EOS or its token budget."""
        if seq.finished or self.running.get(seq.slot) is not seq:
            return None
        kept = []
        for token in tokens:
            if token in self.parts.eos_token_ids and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
                break
            kept.append(token)
            if len(seq.output_ids) + len(kept) >= seq.params.max_new_tokens:
                seq.finish_reason = "length"
                break
        seq.output_ids += kept
        self.stats["generated_tokens"] += len(kept)
        if seq.finished:
            del self.running[seq.slot]
        return TokenEvent(seq, kept)


def _compiled(fn, dynamic: bool):
    # Static shapes specialise per (batch, length, sampling mode) key: allow more than the default 8 of them.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(fn, dynamic=dynamic, fullgraph=False)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A large negative number rather than -inf: fully masked (padding) rows then stay finite instead of NaN.
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def _param_rows(batch: list[Sequence], rows: int, vocab_size: int) -> dict[str, torch.Tensor]:
    pad = rows - len(batch)
    params = [s.params for s in batch]
    return {
        "temperature": torch.tensor([p.temperature for p in params] + [0.0] * pad, dtype=torch.float32),
        "top_p": torch.tensor([p.top_p for p in params] + [1.0] * pad, dtype=torch.float32),
        "top_k": torch.tensor([min(p.top_k, vocab_size) or vocab_size for p in params] + [vocab_size] * pad),
        "seed": torch.tensor([p.seed32() for p in params] + [0] * pad, dtype=torch.long),
    }


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
