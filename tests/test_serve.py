"""The real server (uvicorn on a loopback port) with the tiny graft: OpenAI client, raw-HTTP errors, a batched burst."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import threading
import time

import httpx
import pytest
from conftest import scramble
from PIL import Image

from vlmgraft.infer.generate import generate
from vlmgraft.infer.model import load_for_inference
from vlmgraft.infer.serve import ServeOptions, build_app

KEY = "test-key"
MAX_IMAGE_BYTES = 100_000



def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED_URL = data_url(Image.new("RGB", (64, 48), (200, 30, 30)))


@pytest.fixture(scope="module")
def server(tiny_graft):
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
    yield {"url": f"http://127.0.0.1:{port}", "model": tiny_graft.name, "hf": (model, processor)}
    uv.should_exit = True
    thread.join(timeout=15)
    sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _image_message(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": RED_URL}},
                                         {"type": "text", "text": text}]}]


def test_openai_client_answers_like_the_library_and_streams_the_same_text(server, client):
    reply = client.chat.completions.create(model=server["model"], messages=_image_message("what colour is this"),
                                           max_tokens=6, temperature=0)
    answer = reply.choices[0].message.content
    model, processor = server["hf"]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is this"}]}]
    expected = generate(model, processor, [conversation], [[Image.new("RGB", (64, 48), (200, 30, 30))]],
                        max_new_tokens=6, backend="hf")[0]
    assert answer == expected.text
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == expected.prompt_tokens and reply.usage.completion_tokens <= 6

    chunks = list(client.chat.completions.create(model=server["model"], messages=_image_message("what colour is this"),
                                                 max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_seed_stop_and_template_kwargs_are_honoured(server, client):
    ask = {"model": server["model"], "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
    one = client.chat.completions.create(**ask, temperature=1.0, seed=7).choices[0].message.content
    two = client.chat.completions.create(**ask, temperature=1.0, seed=7).choices[0].message.content
    assert one == two
    greedy = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
    stop = greedy[2:4]
    cut = client.chat.completions.create(**ask, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == greedy[:greedy.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    thinking_off = client.chat.completions.create(**ask, temperature=0,
                                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert thinking_off.usage.prompt_tokens > client.chat.completions.create(**ask, temperature=0).usage.prompt_tokens


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server["model"]]
    health = httpx.get(server["url"] + "/health").json()
    assert health["status"] == "ok" and health["model"] == server["model"] and health["device"] == "cpu"


def _post(server, body, key=KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server["url"] + "/v1/chat/completions", content=raw, headers=headers, timeout=30)
    return httpx.post(server["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_get_openai_errors_not_500s(server, tmp_path):
    ok = {"model": server["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _post(server, ok).status_code == 200
    _error(_post(server, None, raw=b"{not json"), 400)
    assert _error(_post(server, {"model": server["model"]}), 400)["param"] == "messages"
    assert _error(_post(server, {**ok, "temperature": "hot"}), 400)["param"] == "temperature"
    assert _error(_post(server, {**ok, "messages": [{"role": "robot", "content": "x"}]}), 400)["param"]
    assert _error(_post(server, {**ok, "model": "gpt-9"}), 404)["code"] == "model_not_found"
    assert _error(_post(server, ok, key=None), 401)["type"] == "authentication_error"
    _error(_post(server, ok, key="wrong"), 401)
    _error(httpx.get(server["url"] + "/v1/models"), 401)
    _error(httpx.get(server["url"] + "/v1/nothing-here"), 404)

    def with_image(url: str) -> dict:
        return {**ok, "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "what is it"},
                                                                {"type": "image_url", "image_url": {"url": url}}]}]}

    noise = Image.frombytes("RGB", (256, 256), random.Random(0).randbytes(256 * 256 * 3))  # incompressible
    assert _error(_post(server, with_image(data_url(noise))), 413)["code"] == "image_too_large"
    bad = _error(_post(server, with_image("data:image/png;base64,@@@@")), 400)
    assert "messages[1]" in bad["message"] and bad["param"] == "messages[1].content[1].image_url"
    not_image = "data:image/png;base64," + base64.b64encode(b"plain text, no pixels").decode()
    assert "messages[1]" in _error(_post(server, with_image(not_image)), 400)["message"]
    assert "allow-remote-images" in _error(_post(server, with_image("https://example.com/a.png")), 400)["message"]
    local = tmp_path / "red.png"
    Image.new("RGB", (8, 8)).save(local)
    assert "allow-local-files" in _error(_post(server, with_image(str(local))), 400)["message"]
    assert _error(_post(server, {**ok, "max_tokens": 100_000}), 400)["code"] == "context_length_exceeded"
    huge = json.dumps({**ok, "padding": "x" * (16 * MAX_IMAGE_BYTES * 4 // 3 + 2**20)}).encode()
    assert _error(_post(server, None, raw=huge), 413)["code"] == "request_too_large"
    assert _error(_post(server, {**ok, "n": 3}), 400)["param"] == "n"
    literal = {**ok, "messages": [{"role": "user", "content": "<|image_pad|> sneaky"}]}
    assert _post(server, literal).status_code == 400  # an image placeholder typed as text, with no image


def test_a_dropped_stream_frees_its_slot(server):
    body = {"model": server["model"], "messages": [{"role": "user", "content": "tell me a story"}],
            "max_tokens": 150, "stream": True, "stream_options": {"include_usage": True}}
    before = httpx.get(server["url"] + "/health").json()["engine"]["generated_tokens"]
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert next(line for line in lines if line).startswith("data: ")
    for _ in range(100):
        engine = httpx.get(server["url"] + "/health").json()["engine"]
        if engine["running"] == 0 and engine["waiting"] == 0:
            break
        time.sleep(0.05)
    assert engine["running"] == 0 and engine["waiting"] == 0
    assert engine["generated_tokens"] - before < 150  # cancelled, not run to its end


def test_concurrent_burst_is_batched_without_failures(server):
    clients, per_client = 16, 20
    failures: list[str] = []
    answers: list[str] = []

    def one_client(index: int) -> None:
        with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            for j in range(per_client):
                content = f"red green {index} {j}" if j % 4 else [
                    {"type": "image_url", "image_url": {"url": RED_URL}}, {"type": "text", "text": f"colour {j}"}]
                response = http.post("/v1/chat/completions", json={
                    "model": server["model"], "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                    "temperature": 0})
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                else:
                    answers.append(json.loads(response.text)["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=one_client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "the burst did not finish in time"
    assert not failures and len(answers) == clients * per_client
    stats = httpx.get(server["url"] + "/health").json()["engine"]
    assert stats["max_decode_batch"] > 1 and stats["max_prefill_batch"] > 1
    assert stats["running"] == 0 and stats["errors"] == 0
