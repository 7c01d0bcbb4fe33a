"""The Gradio app (app/gradio_app.py) on the streaming engine with the fake model: frames reach the page, keys
and prompts reach the session, and every handler validates its input on the server."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import gradio as gr
import pytest

from tests.fakes import FakeWorldModel
from worldloop.app.gradio_app import GradioWorld, build_app, launch, theme_presets
from worldloop.streaming.engine import Engine

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000
pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app() -> Iterator[SimpleNamespace]:
    engine = Engine(FakeWorldModel(height=64, width=64, fps=20), max_sessions=4, trained=False).start()
    world = GradioWorld(engine)
    demo = build_app(world)
    _, url = launch(demo, host="127.0.0.1", port=free_port(), block=False)
    yield SimpleNamespace(engine=engine, world=world, url=url)
    demo.close()
    engine.close()


def test_handlers_validate_their_input_before_touching_a_session(app: SimpleNamespace) -> None:
    request = SimpleNamespace(session_hash="no-such-tab")
    for data, message in [({"keys": "jump"}, "unknown key"), ({"keys": 64}, "out of range"),
                          ({"keys": [1, 2]}, "bad keys"), ({"keys": "w+" * 100}, "a few key names"),
                          ({"keys": 1, "seq": -1}, "bad key seq"),
                          ({"keys": 1, "seq": "7"}, "bad key seq")]:
        with pytest.raises(gr.Error, match=message):
            app.world.set_keys(gr.EventData(None, data), request)
    for prompt, message in [("x" * 301, "too long"), ("a\x00b", "control character"), ("  ", "empty"),
                            (None, "must be a string")]:
        with pytest.raises(gr.Error, match=message):
            app.world.set_prompt(prompt, request)
    with pytest.raises(gr.Error, match="no live session"):
        app.world.reset(request)


def test_api_callers_get_the_same_checks(app: SimpleNamespace) -> None:
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    with pytest.raises(Exception, match="too long"):
        client.predict("x" * 400, api_name="/prompt")
    with pytest.raises(Exception, match="no live session"):
        client.predict(api_name="/reset")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_the_page_streams_frames_and_sends_keys_and_prompts(app: SimpleNamespace) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(app.url)
        page.wait_for_function("window.worldloopGradio?.framesDrawn >= 5", timeout=TIMEOUT_MS)
        assert app.engine.session_count == 1
        page.click("#wl-view canvas")
        page.keyboard.down("w")
        page.wait_for_function("window.worldloopGradio.lastFrame.keySeq >= 1", timeout=TIMEOUT_MS)
        page.keyboard.up("w")
        name, prompt = theme_presets()[2]
        page.get_by_role("button", name=name, exact=True).click()
        page.wait_for_selector("text=Prompt applied from frame", timeout=TIMEOUT_MS)
        assert page.input_value("#wl-prompt textarea") == prompt
        seed = page.evaluate("window.worldloopGradio.lastFrame.seed")
        page.click("#wl-new-world")
        page.wait_for_function(f"window.worldloopGradio.lastFrame.seed !== {seed}", timeout=TIMEOUT_MS)
        count = page.evaluate("window.worldloopGradio.framesReceived")
        page.wait_for_function(f"window.worldloopGradio.framesReceived > {count + 3}", timeout=TIMEOUT_MS)
        browser.close()
    assert not errors, f"JavaScript errors: {errors}"
    deadline = time.monotonic() + 20
    while app.engine.session_count and time.monotonic() < deadline:  # the closed tab's session ends
        time.sleep(0.2)
    assert app.engine.session_count == 0


def test_the_page_warns_about_untrained_weights_like_the_web_client() -> None:
    for trained in (False, True):
        engine = Engine(FakeWorldModel(height=64, width=64), trained=trained)
        try:
            demo = build_app(GradioWorld(engine))
            texts = [block.value for block in demo.blocks.values() if isinstance(block, gr.Markdown)]
        finally:
            engine.close()
        assert any("untrained weights" in text for text in texts) is not trained, texts
