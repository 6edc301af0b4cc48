"""Batched generation for conversations with images: the one call the chat command and the evaluator use.

On CUDA it runs the engine (continuous batching, CUDA graphs); elsewhere it runs `model.generate()` on left-padded
batches. Both take the same conversations and return the same results, with an optional streaming callback.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from vlmgraft.infer.engine import Engine, EngineConfig
from vlmgraft.infer.model import eos_token_ids
from vlmgraft.infer.prompts import PreparedPrompt, prepare, split_reasoning
from vlmgraft.infer.sampling import SamplingParams
from vlmgraft.infer.textstream import TextStream
from vlmgraft.model.images import ImagePath, image_path_for

StreamCallback = Callable[[int, str], None]  # (conversation index, raw text delta)


@dataclass
class GenerationResult:
    text: str  # the answer, `<think>` block removed
    reasoning: str | None  # the `<think>` block's content, None when the model did not think
    raw_text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"


def generate(model, processor, conversations: list[list[dict]], images: list[list] | None = None, *,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop: list[str] | None = None, enable_thinking: bool | None = None,
             template_kwargs: dict | None = None, stream: StreamCallback | None = None, batch_size: int = 32,
             backend: str = "auto") -> list[GenerationResult]:
    """Answer each conversation (greedy by default). `images[i]` holds the PIL images of conversation i in order.

    enable_thinking: True/False is passed to chat templates with a thinking switch (Qwen3); None keeps the template's
    default. backend: "auto" (engine on CUDA, else "hf"), "engine" or "hf".
    """
    images = images if images is not None else [[] for _ in conversations]
    if len(images) != len(conversations):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=list(stop or []))
    device = next(model.parameters()).device
    if backend == "auto":
        backend = "engine" if device.type == "cuda" else "hf"
    if backend not in ("engine", "hf"):
        raise ValueError(f"backend must be 'auto', 'engine' or 'hf', not {backend!r}")
    path = image_path_for(model)
    # Prepared prompts hold pixel tensors (MBs per image): prepare one window at a time, not the whole list.
    window = batch_size * (2 if backend == "engine" else 1)
    results: list[GenerationResult] = []
    for first in range(0, len(conversations), window):
        prepared = [prepare(processor, conversations[i], images[i], enable_thinking, template_kwargs, path)
                    for i in range(first, min(first + window, len(conversations)))]
        offset_stream = (lambda i, d, base=first: stream(base + i, d)) if stream else None
        run = _generate_engine if backend == "engine" else _generate_hf
        results += run(model, processor, prepared, params, offset_stream, batch_size)
    return results


def _result(stream: TextStream, prompt: PreparedPrompt, completion_tokens: int, finish_reason: str) -> GenerationResult:
    raw = stream.text
    answer, reasoning = split_reasoning(raw, prompt.opens_thinking)
    return GenerationResult(answer, reasoning, raw, len(prompt.input_ids), completion_tokens,
                            "stop" if stream.stopped else finish_reason)


# ---------------------------------------------------------------------------------------------------- engine path
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(model, tokenizer, max_batch_size: int, max_seq_len: int) -> Engine:
    """A cached engine for this model that fits the request (its captured graphs are reused across calls)."""
    engine = _ENGINES.get(model)
    if engine is None or engine.config.max_batch_size < max_batch_size or engine.config.max_seq_len < max_seq_len:
        if engine is not None:
            del _ENGINES[model]
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        engine = Engine(model, tokenizer, EngineConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len))
        _ENGINES[model] = engine
    return engine


def _generate_engine(model, processor, prepared: list[PreparedPrompt], params: SamplingParams,
                     stream: StreamCallback | None, batch_size: int) -> list[GenerationResult]:
    longest = max(len(p.input_ids) for p in prepared)
    # Rounded generously so that later windows and calls reuse this engine (and its captured graphs).
    seq_len = -(-(longest + params.max_new_tokens + 256) // 1024) * 1024
    engine = engine_for(model, processor.tokenizer, min(batch_size, 1 << (len(prepared) - 1).bit_length()), seq_len)
    sequences = [engine.add(p.input_ids, params, **(p.pixels or {})) for p in prepared]
    index = {seq.id: i for i, seq in enumerate(sequences)}
    texts = [TextStream(processor.tokenizer, params.stop) for _ in prepared]
    while engine.has_work():
        for event in engine.step():
            i = index[event.sequence.id]
            delta = texts[i].push(event.new_ids)
            if texts[i].stopped:
                engine.cancel(event.sequence)
            if event.sequence.finished:
                delta += texts[i].finish()
            if stream and delta:
                stream(i, delta)
    return [_result(texts[i], p, len(seq.output_ids), seq.finish_reason or "stop")
            for i, (p, seq) in enumerate(zip(prepared, sequences, strict=True))]


# ---------------------------------------------------------------------------------------------------- HF path
def collate_left_padded(prepared: list[PreparedPrompt], pad_id: int, path: ImagePath) -> dict[str, torch.Tensor]:
    """One batch for `model.generate()`: ids padded on the left, pixels batched as the family's forward takes them."""
    length = max(len(p.input_ids) for p in prepared)
    ids = torch.full((len(prepared), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prepared), length), dtype=torch.long)
    for row, p in enumerate(prepared):
        ids[row, length - len(p.input_ids):] = torch.tensor(p.input_ids)
        mask[row, length - len(p.input_ids):] = 1
    return {"input_ids": ids, "attention_mask": mask, **path.hf_batch([p.pixels for p in prepared])}


class _RowStreamer(BaseStreamer):
    """A transformers streamer that splits each step's tokens by row and feeds per-row text streams."""

    def __init__(self, texts: list[TextStream], eos_ids: list[int], callback: StreamCallback | None):
        self.texts, self.eos_ids, self.callback = texts, set(eos_ids), callback
        self.done = [False] * len(texts)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.texts), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if token in self.eos_ids:
                self.done[row] = True
                continue
            delta = self.texts[row].push([token])
            self.done[row] = self.texts[row].stopped
            if delta and self.callback:
                self.callback(row, delta)

    def end(self) -> None:
        for row, text in enumerate(self.texts):
            delta = text.finish()
            if delta and self.callback:
                self.callback(row, delta)


def _generate_hf(model, processor, prepared: list[PreparedPrompt], params: SamplingParams,
                 stream: StreamCallback | None, batch_size: int) -> list[GenerationResult]:
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate_left_padded(prepared, pad_id, image_path_for(model)).items()}
    # Explicit values everywhere: generate() fills unset (None) ones from the model's sampling defaults.
    sampling = (dict(temperature=1.0, top_p=1.0, top_k=50) if params.greedy  # transformers' neutral defaults
                else dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k))
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
                              eos_token_id=eos_ids, pad_token_id=pad_id, **sampling)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    texts = [TextStream(tokenizer, params.stop) for _ in prepared]
    streamer = _RowStreamer(texts, eos_ids, stream)
    with torch.inference_mode():
        output = model.generate(**batch, generation_config=config, streamer=streamer)
    new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
    results = []
    for p, text, tokens in zip(prepared, texts, new_tokens, strict=True):
        ended = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        count = len(tokens) if ended is None else ended
        results.append(_result(text, p, count, "length" if ended is None else "stop"))
    return results
