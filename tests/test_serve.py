"""The real server (uvicorn on a loopback port) with the tiny graft: OpenAI client, raw-HTTP errors, a batched burst."""

from __future__ import annotations

import base64
import json
import random
import threading

import httpx
import pytest
from PIL import Image
from serving import KEY, MAX_IMAGE_BYTES, data_url, error, post, start_server

from vlmgraft.infer.generate import generate

RED_URL = data_url(Image.new("RGB", (64, 48), (200, 30, 30)))


@pytest.fixture(scope="module")
def server(tiny_graft):
    yield from start_server(tiny_graft)


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


def test_template_kwargs_are_limited_to_the_template_switches(server):
    ok = {"model": server["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key, value in (("chat_template", "PWNED {{ messages|length }}"), ("tokenize", True),
                       ("add_generation_prompt", False), ("continue_final_message", True), ("return_dict", True),
                       ("tools", [{"type": "function", "function": {"name": "f"}}]), ("messages", [])):
        refused = error(post(server, {**ok, "chat_template_kwargs": {key: value}}), 400)
        assert refused["param"] == f"chat_template_kwargs.{key}" and repr(key) in refused["message"]
        assert "enable_thinking" in refused["message"]  # says what is accepted
    wrong_type = error(post(server, {**ok, "chat_template_kwargs": {"enable_thinking": "no"}}), 400)
    assert wrong_type["param"] == "chat_template_kwargs.enable_thinking"
    assert post(server, {**ok, "chat_template_kwargs": {"enable_thinking": False}}).status_code == 200


def test_api_keys_are_compared_as_bytes():
    from vlmgraft.infer.server import bearer_matches

    sent = "Bearer ключ".encode().decode("latin-1")  # how an ASGI server hands over the header
    assert bearer_matches(sent, "ключ")
    assert not bearer_matches(sent, "test-key") and not bearer_matches("Bearer ключ", "test-key")
    assert not bearer_matches("Basic test-key", "test-key") and bearer_matches("bearer test-key ", "test-key")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [server["model"]]
    health = httpx.get(server["url"] + "/health").json()
    assert health["status"] == "ok" and health["model"] == server["model"] and health["device"] == "cpu"


def test_bad_requests_get_openai_errors_not_500s(server, tmp_path):
    ok = {"model": server["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(server, ok).status_code == 200
    error(post(server, None, raw=b"{not json"), 400)
    assert error(post(server, {"model": server["model"]}), 400)["param"] == "messages"
    assert error(post(server, {**ok, "temperature": "hot"}), 400)["param"] == "temperature"
    assert error(post(server, {**ok, "messages": [{"role": "robot", "content": "x"}]}), 400)["param"]
    assert error(post(server, {**ok, "model": "gpt-9"}), 404)["code"] == "model_not_found"
    assert error(post(server, ok, key=None), 401)["type"] == "authentication_error"
    error(post(server, ok, key="wrong"), 401)
    assert error(post(server, ok, key="ключ-ü"), 401)["code"] == "invalid_api_key"  # not a 500
    error(httpx.get(server["url"] + "/v1/models"), 401)
    error(httpx.get(server["url"] + "/v1/nothing-here"), 404)

    def with_image(url: str) -> dict:
        return {**ok, "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "what is it"},
                                                                {"type": "image_url", "image_url": {"url": url}}]}]}

    noise = Image.frombytes("RGB", (256, 256), random.Random(0).randbytes(256 * 256 * 3))  # incompressible
    assert error(post(server, with_image(data_url(noise))), 413)["code"] == "image_too_large"
    bad = error(post(server, with_image("data:image/png;base64,@@@@")), 400)
    assert "messages[1]" in bad["message"] and bad["param"] == "messages[1].content[1].image_url"
    not_image = "data:image/png;base64," + base64.b64encode(b"plain text, no pixels").decode()
    assert "messages[1]" in error(post(server, with_image(not_image)), 400)["message"]
    assert "allow-remote-images" in error(post(server, with_image("https://example.com/a.png")), 400)["message"]
    local = tmp_path / "red.png"
    Image.new("RGB", (8, 8)).save(local)
    assert "allow-local-files" in error(post(server, with_image(str(local))), 400)["message"]
    assert error(post(server, {**ok, "max_tokens": 100_000}), 400)["code"] == "context_length_exceeded"
    huge = json.dumps({**ok, "padding": "x" * (16 * MAX_IMAGE_BYTES * 4 // 3 + 2**20)}).encode()
    assert error(post(server, None, raw=huge), 413)["code"] == "request_too_large"
    assert error(post(server, {**ok, "n": 3}), 400)["param"] == "n"
    literal = {**ok, "messages": [{"role": "user", "content": "<|image_pad|> sneaky"}]}
    assert post(server, literal).status_code == 400  # an image placeholder typed as text, with no image


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
