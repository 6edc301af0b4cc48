"""`vlmgraft webui`: the page in a real browser (Debian's chromium driven by playwright), its error messages, its extra.

The browser test runs on the tiny graft; with VLMGRAFT_WEBUI_MODEL set to another folder (the demo's model) and
VLMGRAFT_WEBUI_SCREENSHOT to a path, the same test takes the README's screenshot of that model.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from conftest import scramble
from PIL import Image

from vlmgraft.cli import main, make_parser
from vlmgraft.data.shapes import ShapesWorld
from vlmgraft.errors import VlmgraftError
from vlmgraft.infer.model import load_for_inference
from vlmgraft.infer.webui import Backend, Page, WebuiOptions, build_ui, launch

CHROMIUM = "/usr/bin/chromium"
NO_CHROMIUM = (f"\n{'!' * 100}\nNO BROWSER: the webui test drives Debian's chromium at {CHROMIUM}, which is not "
               f"installed.\nInstall it with:   apt-get install -y chromium\n(playwright's own browser download "
               f"is not used; .ci/run installs chromium before the tests)\n{'!' * 100}")


def shapes_picture(path: Path) -> Path:
    """A picture like the demo model's training data (one coloured shape), saved as PNG."""
    world = ShapesWorld(image_size=64, palette=("red", "green", "blue", "yellow"), max_shapes=1, noise=0.1, seed=7)
    world.scene(0).image.save(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def small_options(model: str, **overrides) -> WebuiOptions:
    settings = dict(model=model, port=free_port(), device="cpu", dtype="float32", max_new_tokens=8,
                    detect_max_new_tokens=8, max_model_len=512, max_batch_size=4, sync_every=2)
    return WebuiOptions(**settings | overrides)


@pytest.fixture(scope="module")
def backend(tiny_graft):
    model, processor = load_for_inference(tiny_graft, device="cpu", dtype="float32")
    scramble(model)
    backend = Backend(small_options(str(tiny_graft), max_pixels=1_000_000), model, processor)
    backend.start()
    yield backend
    backend.stop()


def test_missing_gradio_is_one_line_naming_the_extra(tiny_graft, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what an install without the [webui] extra sees
    assert main(["webui", str(tiny_graft)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'vlmgraft[webui]'" in err and len(err.splitlines()) == 1


def test_page_binds_loopback_by_default(tiny_graft):
    args = make_parser().parse_args(["webui", str(tiny_graft)])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    assert WebuiOptions(model="m").host == "127.0.0.1"


def test_bad_images_and_failed_generations_are_messages_and_the_page_goes_on(backend, tmp_path, monkeypatch):
    import gradio  # the [webui] extra, in [dev]
    page = Page(backend, gradio)
    state = {"messages": [], "images": [], "image": None}
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(shapes_picture(tmp_path / "whole.png").read_bytes()[:120])
    with pytest.raises(gradio.Error, match="could not decode"):
        list(page.ask(str(truncated), "what colour?", False, [], state))
    huge = tmp_path / "huge.png"
    Image.new("RGB", (1200, 1000)).save(huge)
    with pytest.raises(gradio.Error, match="1200x1000.*over the limit"):
        list(page.detect(str(huge), "square"))
    with pytest.raises(gradio.Error, match="Classes|classes"):
        list(page.detect(str(tmp_path / "whole.png"), " , "))

    def broken_step():
        raise RuntimeError("device fell over")

    with monkeypatch.context() as patch:
        patch.setattr(backend.engine, "step", broken_step)
        with pytest.raises(gradio.Error, match="generation failed.*device fell over"):
            list(page.ask(str(tmp_path / "whole.png"), "what colour?", False, [], state))
    *_, (answer, _, history, after) = page.ask(str(tmp_path / "whole.png"), "what colour?", False, [], state)
    assert answer and len(after["messages"]) == 2 and len(after["images"]) == 1 and len(history) == 2
    *_, (_, _, history, later) = page.ask(str(tmp_path / "whole.png"), "and the shape?", False, history, after)
    assert len(later["messages"]) == 4 and len(later["images"]) == 1  # the same picture is not attached twice
    assert later["messages"][2]["content"] == [{"type": "text", "text": "and the shape?"}]


def test_big_uploads_are_refused_before_decoding(backend, tmp_path):
    strict = Backend(small_options(backend.options.model, max_image_bytes=1000), backend.model, backend.processor)
    big = tmp_path / "big.png"
    Image.effect_noise((200, 200), 50).save(big)
    with pytest.raises(VlmgraftError, match="over the limit of 1000 bytes"):
        strict.load_image(str(big))


def test_real_browser_uploads_asks_streams_and_detects(tiny_graft, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(NO_CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[dev]' (or pip install playwright)")
    model_dir = os.environ.get("VLMGRAFT_WEBUI_MODEL") or str(tiny_graft)
    screenshot = Path(os.environ.get("VLMGRAFT_WEBUI_SCREENSHOT") or tmp_path / "webui.png")
    picture = shapes_picture(tmp_path / "shape.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(picture.read_bytes()[:120])
    demo = model_dir != str(tiny_graft)
    backend = Backend(small_options(model_dir, max_new_tokens=64 if demo else 8, detect_max_new_tokens=48 if demo
                                    else 8))
    if not demo:
        scramble(backend.model)  # answers that depend on the prompt, so that the streamed Answer is not empty
    app = build_ui(backend)
    backend.start()
    launch(backend, app, prevent_thread_lock=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(f"http://127.0.0.1:{backend.options.port}")
            chat = page.get_by_role("tabpanel")
            answer = chat.get_by_label("Answer")

            chat.locator("input[type=file]").set_input_files(str(truncated))  # a broken upload: a message, no crash
            chat.get_by_label("Question").fill("图中形状是什么颜色？")
            chat.get_by_role("button", name="Ask").click()
            page.get_by_text("could not decode").first.wait_for(timeout=30_000)

            page.reload()  # the app is still serving: a fresh page asks again with a good picture
            chat = page.get_by_role("tabpanel")
            answer = chat.get_by_label("Answer")
            chat.locator("input[type=file]").set_input_files(str(picture))
            chat.get_by_label("Question").fill("图中形状是什么颜色？")
            chat.get_by_role("button", name="Ask").click()
            page.wait_for_function("a => a.value.trim().length > 0", arg=answer.element_handle(), timeout=60_000)
            page.get_by_role("button", name="Ask").wait_for(state="visible")
            page.wait_for_function("() => document.querySelectorAll('[data-testid=bot]').length > 0", timeout=60_000)
            assert chat.get_by_label("Thinking").is_checked() is (backend.think_default is not False)
            page.screenshot(path=str(screenshot))

            page.get_by_role("tab", name="Detect").click()
            detect = page.get_by_role("tabpanel")
            detect.locator("input[type=file]").set_input_files(str(picture))
            detect.get_by_label("Classes").fill("圆形, 正方形")
            detect.get_by_role("button", name="Detect").click()
            detect.get_by_text('"parsed"').wait_for(timeout=60_000)
            page.wait_for_function("() => !document.querySelector('[role=tabpanel] .pending')", timeout=30_000)
            assert detect.locator("img").count() >= 2  # the upload and the picture with its boxes
            page.screenshot(path=str(screenshot.with_name(screenshot.stem + "-detect.png")))
            browser.close()
    finally:
        app.close()
        backend.stop()
    assert screenshot.stat().st_size > 10_000 and screenshot.with_name(screenshot.stem + "-detect.png").exists()
