"""The browser client (app/web) in headless Chromium against a real server on loopback (fake model).

Chromium comes from the system (``apt-get install chromium``); without it the browser tests are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from tests.fakes import FakeWorldModel
from worldloop.app.gradio_app import FIRST_THEME, THEME_SEED, theme_presets
from worldloop.streaming.engine import Engine
from worldloop.streaming.server import ServerConfig, WorldloopServer

REPO = Path(__file__).resolve().parent.parent
WEB_DIR = REPO / "app" / "web"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000
pytestmark = pytest.mark.timeout(120)

def test_a_newcomer_starts_in_the_brightest_theme() -> None:
    """The first preset (the page's first prompt) is the theme whose frames are brightest, not the dungeon:
    mean luminance of the first frame of two worlds per theme."""
    from worldloop.distill.world.engine import World
    from worldloop.distill.world.themes import THEMES, sample_params

    world = World([sample_params(THEME_SEED + i, theme) for theme in THEMES for i in range(2)], 64, 64)
    frames = world.render().cpu().numpy().reshape(len(THEMES), -1, 3)
    luminance = dict(zip(THEMES, (frames @ np.array([0.2126, 0.7152, 0.0722])).mean(1), strict=True))
    assert theme_presets()[0][0] == FIRST_THEME == max(luminance, key=luminance.__getitem__)
    assert luminance[FIRST_THEME] > 2 * luminance["dungeon"]


def test_theme_presets_are_the_worlds_own_prompts() -> None:
    shipped = json.loads((WEB_DIR / "themes.json").read_text())
    expected = [{"theme": t, "prompt": p} for t, p in theme_presets()]
    assert shipped == expected, "app/web/themes.json is stale: regenerate it from theme_presets()"


class ServerThread:
    """A worldloop server with the fake model on its own event loop (Playwright's sync API owns ours)."""

    def __init__(self, record_dir: Path, *, token: str | None = None, trained: bool = True) -> None:
        model = FakeWorldModel(height=64, width=64, fps=20)
        self.engine = Engine(model, max_sessions=8, trained=trained).start()
        config = ServerConfig(port=0, web_dir=WEB_DIR, record_dir=record_dir, resume_grace_s=5.0, token=token)
        self.server = WorldloopServer(self.engine, config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.engine.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    running = ServerThread(tmp_path_factory.mktemp("recordings"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server: ServerThread):  # -> playwright Page, streaming frames
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server.server.url)
    wait_frames(page, 3)
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def wait_frames(page, count: int) -> None:  # noqa: ANN001 - Playwright page
    """Wait until the client has drawn ``count`` frames (after a reload its script may not exist yet)."""
    page.wait_for_function(f"window.worldloop && window.worldloop.framesDrawn >= {count}", timeout=TIMEOUT_MS)


def state(page, expression: str):  # noqa: ANN001, ANN201 - Playwright page, any JSON value
    return page.evaluate(f"window.worldloop.{expression}")


def canvas_hash(page) -> str:  # noqa: ANN001
    return page.evaluate("document.getElementById('view').toDataURL().slice(-64)")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
class TestBrowserClient:
    def test_frames_arrive_and_the_hud_shows_the_stream(self, page) -> None:  # noqa: ANN001
        first = state(page, "framesReceived")
        before = canvas_hash(page)
        wait_frames(page, first + 5)
        assert canvas_hash(page) != before
        assert page.text_content("#hud-model") == "fake" and page.text_content("#hud-device") == "cpu"
        assert page.text_content("#hud-steps") == "1"
        assert page.get_attribute("#status", "data-state") == "live"
        assert page.is_hidden("#untrained") and page.is_hidden("#token-form")  # trained weights, no token
        page.wait_for_function("Number(document.getElementById('hud-fps').textContent) > 0",
                               timeout=TIMEOUT_MS)

    def test_held_keys_reach_the_frames(self, page) -> None:  # noqa: ANN001
        page.click("#stage")
        page.keyboard.down("w")
        page.keyboard.down("ArrowLeft")
        assert state(page, "keys") == 0b10001 and state(page, "keySeq") == 2
        page.wait_for_function("window.worldloop.lastHeader.keySeq >= 2", timeout=TIMEOUT_MS)
        page.wait_for_function("window.worldloop.latencyMs > 0", timeout=TIMEOUT_MS)  # the HUD's next update
        assert page.text_content("#hud-latency").endswith(" ms")
        page.keyboard.up("w")
        page.keyboard.up("ArrowLeft")
        assert state(page, "keys") == 0
        page.wait_for_function("window.worldloop.lastHeader.keySeq >= 4", timeout=TIMEOUT_MS)

    def test_typing_a_prompt_does_not_move_and_blur_releases_keys(self, page) -> None:  # noqa: ANN001
        page.click("#prompt")
        page.keyboard.type("was")
        assert state(page, "keySeq") == 0
        page.click("#stage")
        page.keyboard.down("d")
        assert state(page, "keys") == 0b1000
        page.evaluate("window.dispatchEvent(new Event('blur'))")
        assert state(page, "keys") == 0 and state(page, "keySeq") == 2

    def test_touch_buttons_hold_keys(self, page) -> None:  # noqa: ANN001
        box = page.locator('.key[data-key="turn_right"]').bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        assert state(page, "keys") == 0b100000
        page.wait_for_function("window.worldloop.lastHeader.keySeq >= 1", timeout=TIMEOUT_MS)
        page.mouse.up()
        assert state(page, "keys") == 0

    def test_prompt_box_and_theme_buttons_switch_the_prompt(self, page) -> None:  # noqa: ANN001
        page.fill("#prompt", "a bright desert ruins of tan stone block walls")
        page.press("#prompt", "Enter")
        page.wait_for_function("window.worldloop.confirmed?.request === 'prompt'", timeout=TIMEOUT_MS)
        first = state(page, "confirmed.frame")
        name, prompt = theme_presets()[1]
        page.get_by_role("button", name=name, exact=True).click()
        page.wait_for_function(f"window.worldloop.confirmed.frame > {first}", timeout=TIMEOUT_MS)
        assert page.input_value("#prompt") == prompt and state(page, "prompt") == prompt
        assert page.locator("#themes button.active").text_content() == name

    def test_the_first_world_is_the_first_preset_and_typing_replaces_the_prompt(self, page) -> None:  # noqa: ANN001
        first = theme_presets()[0][1]
        assert state(page, "prompt") == first and page.input_value("#prompt") == first
        box = page.locator("#prompt").bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + 10)  # into the middle of the old prompt
        page.keyboard.type("a frozen cavern")
        assert page.input_value("#prompt") == "a frozen cavern"
        page.mouse.click(box["x"] + box["width"] - 4, box["y"] + box["height"] - 4)  # now focused: edits
        page.keyboard.press("End")
        page.keyboard.type(" of ice")
        page.keyboard.press("Enter")
        page.wait_for_function("window.worldloop.confirmed?.request === 'prompt'", timeout=TIMEOUT_MS)
        assert state(page, "prompt") == "a frozen cavern of ice"

    def test_new_world_reset_snapshot_and_rewind(self, page) -> None:  # noqa: ANN001
        seed = state(page, "seed")
        page.click("#new-world")
        page.wait_for_function("window.worldloop.confirmed?.request === 'reset'", timeout=TIMEOUT_MS)
        assert state(page, "seed") != seed and page.text_content("#seed") == str(state(page, "seed"))
        page.click("#snapshot")
        page.wait_for_selector("#snapshots li button", timeout=TIMEOUT_MS)
        assert page.locator("#snapshots li img").get_attribute("src").startswith("data:image/png")
        page.click("#snapshots li button")
        page.wait_for_function("window.worldloop.confirmed.request === 'restore'", timeout=TIMEOUT_MS)

    def test_record_then_download(self, page, tmp_path: Path) -> None:  # noqa: ANN001
        page.click("#record")
        page.wait_for_selector("#rec-badge:not([hidden])", timeout=TIMEOUT_MS)
        wait_frames(page, 20)
        page.click("#record")
        link = page.wait_for_selector("#recordings a", timeout=TIMEOUT_MS)
        response = page.request.get(link.evaluate("a => a.href"))
        assert response.status == 200
        video = tmp_path / "recording.mp4"
        video.write_bytes(response.body())
        with av.open(str(video)) as container:
            assert sum(1 for _ in container.decode(video=0)) >= 1

    def test_reconnects_to_the_same_session_after_a_blip(self, page) -> None:  # noqa: ANN001
        session = state(page, "session")
        page.evaluate("window.worldloop.socket.close()")
        page.wait_for_function("window.worldloop.ready.resumed === true", timeout=TIMEOUT_MS)
        assert state(page, "session") == session
        count = state(page, "framesReceived")
        page.wait_for_function(f"window.worldloop.framesReceived > {count + 3}", timeout=TIMEOUT_MS)

    def test_an_expired_session_is_replaced_by_a_new_one(self, page) -> None:  # noqa: ANN001
        first = state(page, "session")
        page.evaluate("window.worldloop.session = 'expired-session-id-0000'; window.worldloop.socket.close()")
        page.wait_for_function("window.worldloop.errors.some((e) => e.code === 'unknown_session')",
                               timeout=TIMEOUT_MS)
        stale = json.dumps([None, first, "expired-session-id-0000"])
        page.wait_for_function(f"!{stale}.includes(window.worldloop.session)", timeout=TIMEOUT_MS)
        assert state(page, "ready.resumed") is False
        count = state(page, "framesReceived")
        page.wait_for_function(f"window.worldloop.framesReceived > {count + 3}", timeout=TIMEOUT_MS)

    def test_a_token_is_typed_in_kept_for_the_tab_and_never_put_in_the_url(self, browser,  # noqa: ANN001
                                                                            tmp_path: Path) -> None:
        secured = ServerThread(tmp_path, token="open-sesame_42", trained=False)
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(secured.server.url)
            page.wait_for_selector("#token-form:not([hidden])", timeout=TIMEOUT_MS)
            assert page.text_content("#token-note") == "This server needs an access token."
            page.click("#token")
            page.keyboard.type("not the token")
            page.keyboard.press("Enter")
            assert "8 or more" in page.text_content("#token-note") and state(page, "keys") == 0
            page.fill("#token", "wrong-token-123")
            page.keyboard.press("Enter")
            page.wait_for_function("document.getElementById('token-note').textContent.includes('refused')",
                                   timeout=TIMEOUT_MS)
            page.fill("#token", "open-sesame_42")
            page.keyboard.press("Enter")
            wait_frames(page, 3)
            assert page.is_hidden("#token-form") and page.is_visible("#untrained")  # random weights
            assert state(page, "socket.protocol") == "worldloop.v1"
            assert "sesame" not in page.url and "sesame" not in state(page, "socket.url")
            page.reload()  # the token stays with the tab
            wait_frames(page, 1)
            assert page.is_hidden("#token-form")
            page.click("#record")
            page.wait_for_selector("#rec-badge:not([hidden])", timeout=TIMEOUT_MS)
            wait_frames(page, 10)
            page.click("#record")
            with page.expect_download(timeout=TIMEOUT_MS) as download:  # the token goes as a header
                page.click("#recordings a")
            with av.open(download.value.path()) as container:
                assert sum(1 for _ in container.decode(video=0)) >= 1
            assert download.value.suggested_filename.endswith(".mp4")
            assert not errors, f"JavaScript errors: {errors}"
        finally:
            context.close()
            secured.close()

    def test_server_errors_show_in_a_toast(self, page) -> None:  # noqa: ANN001
        page.evaluate("window.worldloop.send('keys', {keys: 999, seq: 1})")
        toast = page.wait_for_selector(".toast", timeout=TIMEOUT_MS)
        assert "999" in toast.text_content()
        assert state(page, "errors[0].code") == "bad_keys"


def test_play_serves_the_page_prints_the_url_and_says_when_no_browser_opens(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "worldloop.app.cli", "play", "--preset", "tiny", "--port", "0",
            "--record-dir", str(tmp_path)]
    env = {**os.environ, "BROWSER": "false", "OMP_NUM_THREADS": "1"}  # a "browser" that always fails
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        url = None
        for line in process.stdout:
            found = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
            if found:
                url = found.group(1)
            if "could not open a browser" in line:
                break
        assert url is not None, process.stderr.read()
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and b'<canvas id="view"' in response.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert "RANDOM, UNTRAINED" in process.stderr.read()
    finally:
        process.kill()
