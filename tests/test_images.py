"""The one image loader as inference uses it: EXIF orientation in chat, serve and detect, safe policy defaults, and
remote fetching that refuses non-global addresses, re-checks redirects and bounds size and time.

No test leaves this machine: addresses are literals or come from a patched resolver, and the only HTTP server is a
local one on 127.0.0.1 that each policy allows explicitly.
"""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vlmgraft.images import ImageError, ImagePolicy, address_allowed, load_image, load_image_oriented


def sideways_jpeg() -> bytes:
    """A 40×20 JPEG, left half red, right half blue, tagged "rotate 90° clockwise to display" (orientation 6)."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def assert_upright(image: Image.Image) -> None:
    assert image.size == (20, 40)  # displayed frame: the stored 40×20 turned a quarter
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # the red half is on top


def test_exif_orientation_is_applied_to_jpeg_and_png():
    image, orientation = load_image_oriented(sideways_jpeg())
    assert orientation == 6
    assert_upright(image)
    stored = Image.open(io.BytesIO(sideways_jpeg()))
    png = io.BytesIO()
    stored.save(png, "PNG", exif=stored.getexif().tobytes())  # PNG carries EXIF in its eXIf chunk
    assert_upright(load_image(png.getvalue()))
    assert load_image(sideways_jpeg(), ImagePolicy(exif_transpose=False)).size == (40, 20)


def test_chat_serve_and_detect_load_images_upright(loaded, tmp_path, monkeypatch):
    from vlmgraft.infer import server
    from vlmgraft.infer.chat import ChatOptions, ChatSession
    from vlmgraft.infer.limits import PixelTally

    path = tmp_path / "phone.jpg"
    path.write_bytes(sideways_jpeg())
    session = ChatSession(*loaded, ChatOptions(model="tiny"), io.StringIO(), io.StringIO())
    session.add_image(str(path))
    assert_upright(session.pending[0])

    seen = []
    monkeypatch.setattr(server, "prepare", lambda processor, conversation, images, **kwargs: seen.extend(images))
    url = "data:image/jpeg;base64," + base64.b64encode(sideways_jpeg()).decode()
    state = server.ServerState(model_id="tiny", processor=None, worker=None)
    server._prepare(state, SimpleNamespace(image_urls=[(url, "messages[0].content[0]")], conversation=[],
                                           template_kwargs={}), PixelTally(state.limits), [(40, 20)])
    assert_upright(seen[0])


def test_the_default_policy_reads_no_local_file_and_no_url(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(path)
    with pytest.raises(ImageError) as err:
        load_image(str(path))
    assert err.value.reason == "local_file" and err.value.code == "local_files_disabled" and "--allow-local-files" \
        in str(err.value)
    with pytest.raises(ImageError) as err:
        load_image("https://example.com/a.png")
    assert err.value.code == "remote_images_disabled" and err.value.status == 400
    assert load_image(str(path), ImagePolicy(allow_local=True)).size == (16, 16)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::",
                                     "fe80::1%eth0", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
                                     "2002:7f00:1::", "64:ff9b::a00:1", "ff02::1"])
def test_non_global_addresses_are_refused(address):
    assert not address_allowed(address)


def test_global_addresses_pass_and_explicit_networks_are_let_through():
    for address in ("8.8.8.8", "93.184.216.34", "2001:4860:4860::8888", "::ffff:8.8.8.8"):
        assert address_allowed(address)
    assert address_allowed("10.1.2.3", ("10.0.0.0/8",)) and not address_allowed("192.168.1.1", ("10.0.0.0/8",))
    with pytest.raises(ValueError, match="allow_networks"):
        ImagePolicy(allow_networks=("not-a-network",))


def _resolve_to(monkeypatch, table: dict[str, list[str]]):
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in table:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in table[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_a_host_resolving_to_a_private_address_is_refused_before_connecting(monkeypatch):
    _resolve_to(monkeypatch, {"internal.example": ["10.0.0.5"], "mixed.example": ["93.184.216.34", "127.0.0.1"]})
    policy = ImagePolicy(allow_remote=True)
    for url in ("http://internal.example/a.png", "https://mixed.example/a.png", "http://169.254.169.254/latest",
                "http://[::1]:8080/a.png"):
        with pytest.raises(ImageError) as err:
            load_image(url, policy)
        assert err.value.reason == "blocked_address" and err.value.status == 400 and "private" in str(err.value)
    with pytest.raises(ImageError, match="not a valid URL"):  # an unparsable URL is the client's error, not a crash
        load_image("http://[zz]/a.png", policy)


PNG = io.BytesIO()
Image.new("RGB", (24, 16), (0, 200, 0)).save(PNG, "PNG")


class _Handler(http.server.BaseHTTPRequestHandler):
    release = threading.Event()
    hosts: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.hosts.append(self.headers.get("Host", ""))
        routes = {"/hop": "/img.png", "/loop": "/loop", "/private": "http://10.0.0.1/img.png",
                  "/scheme": "file:///etc/passwd"}
        if self.path in routes:
            self.send_response(302)
            self.send_header("Location", routes[self.path])
            self.end_headers()
            return
        body = PNG.getvalue() if self.path in ("/img.png", "/stall") else b"x" * 5000
        self.send_response(200)
        if self.path != "/big-undeclared":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/stall":
            self.release.wait(30)  # headers sent, body withheld until the test is done
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def local_server():
    _Handler.release = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    _Handler.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_redirects_are_bounded_and_every_hop_is_checked(local_server, monkeypatch):
    with pytest.raises(ImageError) as err:  # loopback is refused unless the policy names it
        load_image(f"http://{local_server}/img.png", ImagePolicy(allow_remote=True))
    assert err.value.reason == "blocked_address"
    policy = ImagePolicy(allow_remote=True, allow_networks=("127.0.0.1/32",), max_redirects=2)
    assert load_image(f"http://{local_server}/img.png", policy).size == (24, 16)
    assert load_image(f"http://{local_server}/hop", policy).size == (24, 16)
    for path, reason, words in [("/loop", "fetch_failed", "more than 2 redirects"),
                                ("/private", "blocked_address", "10.0.0.1"),
                                ("/scheme", "unsupported", "http(s)")]:
        with pytest.raises(ImageError) as err:
            load_image(f"http://{local_server}{path}", policy)
        assert err.value.reason == reason and words in str(err.value)
    # the connection goes to the address that was checked, while the request keeps the name it was asked by
    _resolve_to(monkeypatch, {"images.test": ["127.0.0.1"]})
    port = local_server.split(":")[1]
    _Handler.hosts.clear()
    assert load_image(f"http://images.test:{port}/img.png", policy).size == (24, 16)
    assert _Handler.hosts == [f"images.test:{port}"]


def test_downloads_are_capped_in_size_and_read_time(local_server):
    policy = ImagePolicy(allow_remote=True, allow_networks=("127.0.0.1/32",), max_bytes=1000, read_timeout_s=0.2)
    for path in ("/big", "/big-undeclared"):  # refused from the declared length, or while streaming
        with pytest.raises(ImageError) as err:
            load_image(f"http://{local_server}{path}", policy)
        assert err.value.status == 413 and err.value.code == "image_too_large"
    with pytest.raises(ImageError) as err:
        load_image(f"http://{local_server}/stall", policy)
    assert err.value.reason == "fetch_failed" and "timed out reading" in str(err.value)
