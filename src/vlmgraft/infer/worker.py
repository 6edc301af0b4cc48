"""The engine's background thread: collects requests from any thread, batches them, and streams text back.

Callers (the server's event loop) `submit` a prepared prompt with a callback; the worker owns the engine, so every
engine call happens on this one thread. When idle, the first arrival opens a short batching window so requests that
arrive together are prefilled together; while decoding, new arrivals join at the next chunk boundary.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vlmgraft.infer.engine import Engine, Sequence
from vlmgraft.infer.prompts import PreparedPrompt
from vlmgraft.infer.sampling import SamplingParams
from vlmgraft.infer.textstream import TextStream

log = logging.getLogger(__name__)


@dataclass
class StreamEvent:
    delta: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None  # set on the last event: "stop" or "length"
    error: str | None = None


class Request:
    def __init__(self, prepared: PreparedPrompt, params: SamplingParams, on_event: Callable[[StreamEvent], None],
                 text: TextStream):
        self.prepared, self.params, self.on_event, self.text = prepared, params, on_event, text
        self.sequence: Sequence | None = None
        self.done = False


class EngineWorker:
    def __init__(self, engine: Engine, tokenizer, batch_window_s: float = 0.01):
        self.engine = engine
        self.tokenizer = tokenizer
        self.batch_window_s = batch_window_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[int, Request] = {}
        self._thread = threading.Thread(target=self._run, name="vlmgraft-engine", daemon=True)
        self._stopping = False
        self.stats = {"requests": 0, "errors": 0}

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def submit(self, prepared: PreparedPrompt, params: SamplingParams,
               on_event: Callable[[StreamEvent], None]) -> Request:
        """Queue a request; `on_event` is called on the worker thread with each text delta and a final event."""
        request = Request(prepared, params, on_event, TextStream(self.tokenizer, params.stop))
        self._inbox.put(("add", request))
        return request

    def cancel(self, request: Request) -> None:
        self._inbox.put(("cancel", request))

    def snapshot(self) -> dict:
        engine = self.engine
        return {**self.stats, **engine.stats, "running": len(engine.running), "waiting": len(engine.waiting),
                "max_batch_size": engine.config.max_batch_size, "cuda_graphs": len(engine.runner.graphs)}

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while not self._stopping:
            try:
                if not self.engine.has_work():
                    self._handle(self._inbox.get())
                    deadline = time.monotonic() + self.batch_window_s
                    while (left := deadline - time.monotonic()) > 0 and not self._stopping:
                        try:
                            self._handle(self._inbox.get(timeout=left))
                        except queue.Empty:
                            break
                self._drain()
                if self._stopping:
                    break
                if self.engine.has_work():
                    self._dispatch(self.engine.step())
            except Exception as err:  # keep serving: fail what was in flight, report it, carry on
                log.exception("engine step failed")
                self._fail_all(f"{type(err).__name__}: {err}")

    def _drain(self) -> None:
        while True:
            try:
                self._handle(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _handle(self, command) -> None:
        kind, request = command
        if kind == "stop":
            self._stopping = True
        elif kind == "add":
            self.stats["requests"] += 1
            p = request.prepared
            try:
                request.sequence = self.engine.add(p.input_ids, request.params, p.pixel_values, p.pixel_attention_mask)
            except ValueError as err:
                self._finish(request, StreamEvent(error=str(err)))
                return
            self._requests[request.sequence.id] = request
        elif kind == "cancel" and request.sequence is not None and not request.done:
            self.engine.cancel(request.sequence)
            self._requests.pop(request.sequence.id, None)
            request.done = True

    def _dispatch(self, events) -> None:
        for event in events:
            request = self._requests.get(event.sequence.id)
            if request is None:
                continue
            seq = event.sequence
            delta = request.text.push(event.new_ids)
            if request.text.stopped:
                self.engine.cancel(seq)
            if seq.finished:
                delta += request.text.finish()
                reason = "stop" if request.text.stopped else seq.finish_reason
                tokens = len(seq.output_ids) + (1 if reason == "stop" and not request.text.stopped else 0)
                self._requests.pop(seq.id, None)
                self._finish(request, StreamEvent(delta, tokens, reason))
            elif delta:
                request.on_event(StreamEvent(delta, len(seq.output_ids)))

    def _finish(self, request: Request, event: StreamEvent) -> None:
        request.done = True
        if event.error:
            self.stats["errors"] += 1
        request.on_event(event)

    def _fail_all(self, message: str) -> None:
        for request in list(self._requests.values()):
            if request.sequence is not None:
                self.engine.cancel(request.sequence)
            self._finish(request, StreamEvent(error=message))
        self._requests.clear()
        self.engine.waiting.clear()
        self.engine.running.clear()
