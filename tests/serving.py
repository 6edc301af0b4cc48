"""Shared by the serve tests: the real server (uvicorn on a loopback port) over the tiny graft, and request helpers."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
from conftest import scramble
from PIL import Image

from vlmgraft.infer.model import load_for_inference
from vlmgraft.infer.serve import ServeOptions, build_app

KEY = "test-key"
MAX_IMAGE_BYTES = 100_000


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(tiny_graft):
    """Yields {"url", "model", "hf": (model, processor), "state": the app's ServerState}; stops it afterwards."""
    import uvicorn

    model, processor = load_for_inference(tiny_graft, device="cpu", dtype="float32")
    scramble(model)
    options = ServeOptions(model=str(tiny_graft), api_key=KEY, max_batch_size=16, max_model_len=256,
                           max_image_bytes=MAX_IMAGE_BYTES, device="cpu", batch_window_ms=20, sync_every=2)
    app = build_app(options, model, processor)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    assert uv.started, "server did not start"
    yield {"url": f"http://127.0.0.1:{port}", "model": tiny_graft.name, "hf": (model, processor),
           "state": app.state.vlmgraft}
    uv.should_exit = True
    thread.join(timeout=15)
    sock.close()
    assert not thread.is_alive()


def post(server, body, key=KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}".encode()} if key else {}  # as bytes: a key may be non-ASCII
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server["url"] + "/v1/chat/completions", content=raw, headers=headers, timeout=30)
    return httpx.post(server["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def error(response, status):
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


def health(server) -> dict:
    return httpx.get(server["url"] + "/health").json()


def wait_for(condition, what: str, tries: int = 400):
    """Poll until condition() is truthy (the server runs in other threads); returns its value."""
    for _ in range(tries):
        if value := condition():
            return value
        time.sleep(0.025)
    raise AssertionError(f"gave up waiting for {what}")
