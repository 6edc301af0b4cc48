"""The engine's background thread: collects requests from any thread, batches them, and streams text back.

Callers (the server's event loop) `submit` a prepared prompt with a callback; the worker owns the engine, so every
engine call happens on this one thread. When idle, the first arrival opens a short batching window so requests that
arrive together are prefilled together; while decoding, new arrivals join at the next chunk boundary.

A failing step fails as few requests as it can: a prefill batch that raises (one prompt too large for the memory left)
is retried one request at a time, and a failing decode chunk fails the running requests but not the queued ones. A
CUDA error other than out-of-memory, or several failed steps in a row, marks the worker faulty: `fault()` says why,
and the server's /health reports it so that an orchestrator restarts the process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlmgraft.infer.engine import Engine, PrefillError, Sequence
from vlmgraft.infer.prompts import PreparedPrompt
from vlmgraft.infer.sampling import SamplingParams
from vlmgraft.infer.textstream import TextStream

log = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # failed steps in a row, with no step succeeding between them, that mark the engine faulty


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
        self._fault: str | None = None
        self._failed_steps = 0
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

    def fault(self) -> str | None:
        """Why this worker can no longer serve (a broken device, repeated failures, a dead thread), else None."""
        if self._fault is None and not self._stopping and not self._thread.is_alive() and self._thread.ident:
            return "the engine thread has stopped"
        return self._fault

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
            except PrefillError as err:
                self._prefill_failed(err)
            except Exception as err:  # keep serving: fail the running requests (queued ones were not in the step)
                log.exception("engine step failed")
                running = set(self.engine.running.values())
                # With nothing running, the step could only have been starting the queued requests: they are at fault,
                # and leaving them queued would just repeat the failure until the worker gives up.
                self._step_failed(err, [r for r in self._requests.values() if r.sequence in running]
                                  or list(self._requests.values()))

    def _prefill_failed(self, err: PrefillError) -> None:
        cause = err.__cause__
        if len(err.batch) > 1 and not is_device_fault(cause):
            log.warning("a prefill of %d requests failed (%s); retrying them one at a time", len(err.batch), err)
            self.engine.alone = len(err.batch)
            _release_cached_memory()
            return
        log.error("the prefill of a request failed", exc_info=cause)
        self._step_failed(cause, [self._requests[seq.id] for seq in err.batch if seq.id in self._requests])

    def _step_failed(self, err: BaseException, failed: list[Request]) -> None:
        """Fail the requests of a step that raised; all of them, and the worker for good, if the device broke."""
        message = f"{type(err).__name__}: {err}"
        self._failed_steps += 1
        if is_device_fault(err):
            self._fault = f"device error: {message}"
        elif self._failed_steps >= MAX_FAILED_STEPS:
            self._fault = f"{self._failed_steps} engine steps failed in a row, the last with {message}"
        if self._fault:
            log.error("engine out of service: %s", self._fault)
            failed = list(self._requests.values())
        for request in failed:
            self.engine.cancel(request.sequence)
            self._requests.pop(request.sequence.id, None)
            self._finish(request, StreamEvent(error=message))
        if self._fault:
            self.engine.waiting.clear()
            self.engine.running.clear()
        _release_cached_memory()

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
            if self._fault:
                self._finish(request, StreamEvent(error=f"the engine is out of service: {self._fault}"))
                return
            try:
                request.sequence = self.engine.add(p.input_ids, request.params, **(p.pixels or {}))
            except ValueError as err:
                self._finish(request, StreamEvent(error=str(err)))
                return
            self._requests[request.sequence.id] = request
        elif kind == "cancel" and request.sequence is not None and not request.done:
            self.engine.cancel(request.sequence)
            self._requests.pop(request.sequence.id, None)
            request.done = True

    def _dispatch(self, events) -> None:
        if events:
            self._failed_steps = 0
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



def is_device_fault(err: BaseException | None) -> bool:
    """A CUDA error other than running out of memory: the context is unusable and every later step fails too."""
    text = str(err)
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text:
        return False
    if isinstance(err, getattr(torch, "AcceleratorError", ())):
        return True
    return isinstance(err, RuntimeError) and any(
        mark in text for mark in ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "device-side assert"))


def _release_cached_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
