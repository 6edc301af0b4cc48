"""The server under hostile or unlucky conditions: huge images in small bodies, many bodies at once, clients that hang
up, and engine steps that fail (injected on the CPU)."""

from __future__ import annotations

import base64
import socket
import struct
import zlib
from urllib.parse import urlparse

import pytest
from PIL import Image, ImageFile
from serving import KEY, data_url, error, health, post, start_server, wait_for

from vlmgraft.infer.limits import declared_size
from vlmgraft.infer.openai_api import ApiError

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
