"""The server under hostile or unlucky conditions: huge images in small bodies, many bodies at once, clients that hang
up, and engine steps that fail (injected on the CPU)."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import zlib
from types import SimpleNamespace
from urllib.parse import urlparse

import httpx
import pytest
import torch
from PIL import Image, ImageFile
from serving import KEY, data_url, error, health, post, start_server, wait_for

from vlmgraft.infer.engine import Engine, EngineConfig
from vlmgraft.infer.limits import declared_size
from vlmgraft.infer.openai_api import ApiError
from vlmgraft.infer.prompts import prepare
from vlmgraft.infer.sampling import SamplingParams
from vlmgraft.infer.worker import EngineWorker

RED_URL = data_url(Image.new("RGB", (64, 48), (200, 30, 30)))
BIG_URL = data_url(Image.new("1", (5000, 5000), 1))  # 25 megapixels in about 12 KB: its header says so, not its size


@pytest.fixture(scope="module")
def server(tiny_graft):
    yield from start_server(tiny_graft)


def _ask(server, content, **extra) -> dict:
    return {"model": server["model"], "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def _images(*urls: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": "what?"}]


def _send(server, body: bytes, declared: int | None = None) -> socket.socket:
    """A raw HTTP request (the test decides when the connection closes); `declared` > len(body): a slow upload."""
    url = urlparse(server["url"])
    sock = socket.create_connection((url.hostname, url.port))
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared or len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def test_images_are_counted_and_measured_before_any_is_decoded(server, monkeypatch):
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size) or load(image))

    many = error(post(server, _ask(server, _images(*[RED_URL] * 17))), 400)
    assert many["code"] == "too_many_images" and "16" in many["message"]
    assert "--max-images-per-request" in many["message"]
    huge = error(post(server, _ask(server, _images(BIG_URL, BIG_URL, BIG_URL))), 413)
    assert huge["code"] == "too_many_pixels" and huge["param"] == "messages[0].content[2].image_url"
    assert "75,000,000" in huge["message"] and "--max-request-pixels" in huge["message"]
    assert decoded == []  # refused from the headers alone

    one = post(server, _ask(server, _images(BIG_URL)))  # within the limit: decoded as before
    assert one.status_code == 200 or error(one, 400)["code"] == "context_length_exceeded"
    assert set(decoded) == {(5000, 5000)}


def test_an_image_header_too_large_for_pil_to_open_is_refused_not_decoded():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def header_only(width: int, height: int) -> str:  # a PNG that declares its size and holds no pixels
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        return "data:image/png;base64," + base64.b64encode(png + chunk(b"IEND", b"")).decode()

    assert declared_size(header_only(300, 200), "p") == (300, 200)
    with pytest.raises(ApiError) as refused:
        declared_size(header_only(20_000, 20_000), "messages[0].content[0].image_url")
    assert refused.value.status == 413 and refused.value.param == "messages[0].content[0].image_url"
    assert declared_size("data:image/png;base64,@@", "p") is None  # loading it reports the precise error


def test_request_bodies_held_at_once_are_bounded(server, monkeypatch):
    monkeypatch.setattr(server["state"].bodies, "limit", 20_000)
    slow = _send(server, b'{"model": ', declared=15_000)  # an upload still arriving
    wait_for(lambda: health(server)["pending_body_bytes"] == 15_000, "the slow upload to be counted")
    padded = _ask(server, "hi", user="x" * 10_000)
    busy = post(server, padded)
    assert error(busy, 503)["code"] == "server_busy" and "--max-pending-bytes" in busy.json()["error"]["message"]
    assert busy.headers["retry-after"] == "1"
    assert post(server, _ask(server, "hi")).status_code == 200  # a small one still fits
    slow.close()
    wait_for(lambda: health(server)["pending_body_bytes"] == 0, "the abandoned upload to be released")
    assert post(server, padded).status_code == 200


@pytest.fixture
def gate(server, monkeypatch):
    """The server's engine takes a step only per released permit; `cancelled` is set when the server cancels."""
    worker = server["state"].worker
    permits, cancelled = threading.Semaphore(0), threading.Event()
    step, cancel = worker.engine.step, worker.cancel

    def gated_step():
        permits.acquire(timeout=60)
        return step()

    def noted_cancel(request):
        cancelled.set()
        cancel(request)

    monkeypatch.setattr(worker.engine, "step", gated_step)
    monkeypatch.setattr(worker, "cancel", noted_cancel)
    yield SimpleNamespace(permits=permits, cancelled=cancelled)
    permits.release(100_000)


def _story(server, stream: bool) -> dict:
    return _ask(server, "tell me a story", max_tokens=150, temperature=0, stream=stream)


def _generating(server, before: int) -> dict:
    """Let the prefill and one decode chunk run; the engine's stats once its first tokens are out."""
    return wait_for(lambda: (e := health(server)["engine"])["generated_tokens"] > before and e, "the first tokens")


def _hung_up(server, gate, before: int) -> None:
    assert gate.cancelled.wait(30), "the server did not cancel the generation of a client that hung up"
    gate.permits.release(100_000)
    engine = wait_for(lambda: (e := health(server)["engine"])["running"] + e["waiting"] == 0 and e, "a free slot")
    assert engine["generated_tokens"] - before < 15  # the chunk in flight at most, not the 150 tokens asked


def test_a_client_that_hangs_up_without_streaming_frees_its_slot(server, gate):
    before = health(server)["engine"]["generated_tokens"]
    sock = _send(server, json.dumps(_story(server, stream=False)).encode())
    gate.permits.release(2)
    assert _generating(server, before)["running"] == 1  # still generating when the client goes
    sock.close()
    _hung_up(server, gate, before)


def test_a_dropped_stream_frees_its_slot(server, gate):
    before = health(server)["engine"]["generated_tokens"]
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=_story(server, stream=True),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        lines = response.iter_lines()  # kept: a dropped line iterator closes the connection
        assert next(lines).startswith("data: ")
        gate.permits.release(2)
        assert _generating(server, before)["running"] == 1  # still streaming when the client goes
    _hung_up(server, gate, before)


def test_a_broken_device_fails_health_and_new_requests(server, monkeypatch):
    worker = server["state"].worker
    monkeypatch.setattr(worker, "_fault", None)  # restored on teardown: the module's server serves on
    monkeypatch.setattr(worker, "_failed_steps", 0)

    def broken(*args):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(worker.engine, "_decode_chunk", broken)
    assert error(post(server, _ask(server, "hi")), 500)["type"] == "server_error"
    response = httpx.get(server["url"] + "/health")
    assert response.status_code == 503
    assert response.json()["status"] == "error" and "illegal memory access" in response.json()["reason"]
    assert error(post(server, _ask(server, "hi")), 503)["code"] == "engine_unavailable"


# ---------------------------------------------------------------- the worker alone, with failures injected


def _serve_all(engine, processor, texts: list[str]) -> list[list]:
    """Submit the prompts together (one prefill batch), run the worker until all are answered; events per prompt."""
    worker = EngineWorker(engine, processor.tokenizer)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    events, done = [[] for _ in texts], [threading.Event() for _ in texts]

    def collect(i):
        return lambda ev: (events[i].append(ev), (ev.finish_reason or ev.error) and done[i].set())

    for i, text in enumerate(texts):
        worker.submit(prepare(processor, [{"role": "user", "content": text}], []), params, collect(i))
    worker.start()
    try:
        assert all(d.wait(60) for d in done)
    finally:
        worker.stop()
    return events, worker


def _engine(model, processor):
    return Engine(model, processor.tokenizer, EngineConfig(max_batch_size=4, max_seq_len=256, sync_every=2),
                  eos_token_ids=[])


def _text(events) -> str:
    return "".join(ev.delta for ev in events)


def test_a_prefill_that_fails_fails_only_its_request(loaded, monkeypatch):
    model, processor = loaded
    texts = ["hello", "this prompt is too large for the memory left", "bye"]
    expected, _ = _serve_all(_engine(model, processor), processor, [texts[0], texts[2]])
    engine = _engine(model, processor)
    poisoned = prepare(processor, [{"role": "user", "content": texts[1]}], []).input_ids
    batches, prefill = [], engine._prefill

    def failing_prefill(batch):
        batches.append(len(batch))
        if any(seq.prompt_ids == poisoned for seq in batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return prefill(batch)

    monkeypatch.setattr(engine, "_prefill", failing_prefill)
    events, worker = _serve_all(engine, processor, texts)
    assert batches[0] == 3 and batches[1:] == [1, 1, 1]  # tried together, then retried one at a time
    assert "OutOfMemoryError" in events[1][-1].error
    for mine, alone in zip((events[0], events[2]), expected, strict=True):
        assert mine[-1].error is None and mine[-1].finish_reason == "length"
        assert _text(mine) == _text(alone)  # the others answer as if nothing had happened
    assert worker.fault() is None and worker.stats["errors"] == 1


def test_repeated_failures_put_the_worker_out_of_service(loaded, monkeypatch):
    model, processor = loaded
    engine = _engine(model, processor)

    def out_of_memory(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine, "_prefill", out_of_memory)
    events, worker = _serve_all(engine, processor, ["one", "two", "three"])
    assert all("OutOfMemoryError" in e[-1].error for e in events)
    assert "3 engine steps failed in a row" in worker.fault()
