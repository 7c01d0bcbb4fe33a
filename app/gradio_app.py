"""The Gradio app: the live world in a Gradio page, driven by the streaming ``Engine`` in-process.

Each browser tab is one engine session (keyed by Gradio's session hash). A generator event started on page
load streams the session's frames (JPEG, encoded by the engine's pool) into a ``gr.HTML`` view that draws them
on a canvas; the view reuses the browser client's own modules (``app/web/input.js`` for held keys and touch
buttons, ``app/web/view.js`` for drawing and the FPS/latency meter) and sends key changes as events. Every
handler validates its input on the server (Gradio enforces nothing for API callers). Run it with
``worldloop gradio``; ``build_app(engine)`` returns the ``gr.Blocks`` for tests and embedding.
"""

from __future__ import annotations

import base64
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from worldloop.distill.world.themes import THEMES, describe, sample_params
from worldloop.models.keys import parse_keys
from worldloop.models.text import MAX_PROMPT_CHARS, validate_prompt
from worldloop.streaming.engine import Engine
from worldloop.streaming.session import EngineFull, Frame, SessionHandle, SessionOptions

WEB_DIR = Path(__file__).resolve().parent / "web"
THEME_SEED = 0  # the world seed whose exact description each theme button uses
# The world a newcomer sees first (the browser client's and this app's first prompt): the brightest theme
# (mean luminance of its frames: ice cave 127, toxic lab 90, desert ruins 87, …, dungeon 51 of 255;
# tests/test_web_client.py measures it), not the near-black dungeon.
FIRST_THEME = "ice cave"
FRAME_TIMEOUT_S = 5.0  # the stream gives up on a session that makes no frame for this long
U32_MAX = 2**32 - 1


def theme_presets() -> list[tuple[str, str]]:
    """(theme, prompt) for every theme of the built-in world, worded exactly as the world words them;
    ``FIRST_THEME`` first, the others in the world's order."""
    themes = sorted(THEMES, key=lambda theme: theme != FIRST_THEME)
    return [(theme, describe(sample_params(THEME_SEED, theme))) for theme in themes]


@dataclass(eq=False)
class Player:
    """One browser tab's engine session and the newest frame it has not yet shown."""

    handle: SessionHandle
    seed: int
    prompt: str
    latest: Frame | None = None
    ready: threading.Condition = field(default_factory=threading.Condition)

    def on_frame(self, frame: Frame) -> None:  # encoder pool thread; the newest frame wins
        with self.ready:
            self.latest = frame
            self.ready.notify_all()

    def next_frame(self, timeout: float) -> Frame | None:
        with self.ready:
            if self.latest is None:
                self.ready.wait(timeout)
            frame, self.latest = self.latest, None
            return frame


class GradioWorld:
    """The app's state: the engine and one ``Player`` per open tab."""

    def __init__(self, engine: Engine, *, quality: int = 85) -> None:
        self.engine = engine
        self.quality = quality
        self.presets = theme_presets()
        self._players: dict[str, Player] = {}
        self._lock = threading.Lock()

    # ---- handlers (each checks its inputs; API callers can send anything) ----
    def stream(self, prompt: str, request: gr.Request) -> Iterator[dict[str, Any]]:
        """Open this tab's session and yield its frames for as long as the tab stays."""
        prompt = _checked_prompt(prompt)
        key = _session_key(request)
        self.leave(request)  # a reload of the same tab replaces its old session
        seed = random.randrange(U32_MAX)
        player = self._open(key, prompt, seed)
        info = {"model": self.engine.model_name, "device": self.engine.device, "steps": self.engine.steps}
        try:
            while True:
                frame = player.next_frame(FRAME_TIMEOUT_S)
                if player.handle.closed.done():
                    raise gr.Error("the session has ended; reload the page to start a new one")
                if frame is None:
                    continue
                data = base64.b64encode(frame.payload).decode("ascii")
                yield {"src": f"data:image/jpeg;base64,{data}", "frame": frame.seq, "key_seq": frame.key_seq,
                       "seed": player.seed, **info}
        finally:
            self._close(key, player)

    def set_keys(self, evt: gr.EventData, request: gr.Request) -> None:
        data = getattr(evt, "_data", None) or {}
        keys = data.get("keys", 0)
        if isinstance(keys, (str, list)) and len(keys) > 64:
            raise gr.Error("bad keys: expected a bitmask or a few key names")
        try:
            mask = parse_keys(keys)
        except (TypeError, ValueError) as err:
            raise gr.Error(f"bad keys: {err}") from None
        seq = data.get("seq", 0)
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= U32_MAX:
            raise gr.Error(f"bad key seq {seq!r}: expected an integer 0..{U32_MAX}")
        self._player(request).handle.set_keys(mask, seq)

    def set_prompt(self, prompt: str, request: gr.Request) -> str:
        prompt = _checked_prompt(prompt)
        player = self._player(request)
        frame = player.handle.set_prompt(prompt).result(timeout=30)
        player.prompt = prompt
        gr.Info(f"Prompt applied from frame {frame}.")
        return prompt

    def reset(self, request: gr.Request) -> None:
        self._player(request).handle.reset().result(timeout=30)

    def new_world(self, prompt: str, request: gr.Request) -> None:
        """Restart with a fresh seed and the prompt in the box: the session starts again the way it started,
        so from a fresh built-in world of that prompt's theme by default (the view's HUD shows the seed)."""
        prompt = _checked_prompt(prompt)
        player = self._player(request)
        player.seed, player.prompt = random.randrange(U32_MAX), prompt
        player.handle.reset(prompt=prompt, seed=player.seed).result(timeout=30)

    def leave(self, request: gr.Request) -> None:
        key = _session_key(request)
        with self._lock:
            player = self._players.get(key)
        if player is not None:
            self._close(key, player)

    # ---- sessions ----
    def _open(self, key: str, prompt: str, seed: int) -> Player:
        options = SessionOptions(prompt, seed=seed, image_format="jpeg", quality=self.quality)
        try:
            handle = self.engine.open_session(options)
        except EngineFull as err:
            raise gr.Error(f"no free session: {err}; try again later") from None
        player = Player(handle, seed, prompt)
        handle.on_frame = player.on_frame
        with self._lock:
            self._players[key] = player
        handle.started.result(timeout=60)
        return player

    def _close(self, key: str, player: Player) -> None:
        with self._lock:
            if self._players.get(key) is player:
                del self._players[key]
        player.handle.close()

    def _player(self, request: gr.Request) -> Player:
        with self._lock:
            player = self._players.get(_session_key(request))
        if player is None:
            raise gr.Error("no live session in this tab; reload the page")
        return player


def _session_key(request: gr.Request | None) -> str:
    key = getattr(request, "session_hash", None)
    if not key:
        raise gr.Error("this app needs a browser session (Gradio session hash)")
    return key


def _checked_prompt(prompt: Any) -> str:
    try:
        text = validate_prompt(prompt)
    except ValueError as err:
        raise gr.Error(f"bad prompt: {err}") from None
    if not text:
        raise gr.Error("the prompt is empty")
    return text


# The view: a canvas with a HUD and touch buttons. Its script (app/web/gradio.js, served by Gradio) draws each
# frame the stream yields and sends key changes as `input` events.
VIEW_TEMPLATE = """
<div class="wl-root">
  <div class="wl-hud">
    <span>FPS <b data-hud="fps">–</b></span><span>latency <b data-hud="latency">–</b></span>
    <span>model <b data-hud="model">–</b></span><span>device <b data-hud="device">–</b></span>
    <span>steps <b data-hud="steps">–</b></span><span>frame <b data-hud="frame">–</b></span>
    <span>seed <b data-hud="seed">–</b></span>
  </div>
  <div class="wl-stage" tabindex="0"><canvas width="512" height="512"></canvas></div>
  <div class="wl-pad">
    <button type="button" class="key" data-key="turn_left">⟲ Q</button>
    <button type="button" class="key" data-key="left">A</button>
    <button type="button" class="key" data-key="forward">W</button>
    <button type="button" class="key" data-key="back">S</button>
    <button type="button" class="key" data-key="right">D</button>
    <button type="button" class="key" data-key="turn_right">E ⟳</button>
  </div>
  <p class="wl-hint">Click the view, then hold W A S D to move and Q E or ← → to turn.</p>
</div>
"""

# The view's script and style live next to the browser client's (app/web/gradio.js, gradio.css).
VIEW_JS = "import(`${props.web_base}/gradio.js`).then((m) => m.mount(element, props, trigger, watch));"

DARK_MODE_JS = "() => { document.body.classList.add('dark'); }"


def build_app(world: GradioWorld) -> gr.Blocks:
    """The page: the live view on the left, prompt, themes and world controls on the right."""
    first_prompt = world.presets[0][1]
    with gr.Blocks(title="worldloop") as demo:
        gr.Markdown("## worldloop — a world model you can walk through")
        if not world.engine.trained:  # the web client's "untrained weights" badge says the same
            gr.Markdown("**Random, untrained weights**: the pictures are noise; the stream and the controls "
                        "are real.")
        with gr.Row():
            with gr.Column(scale=3):
                view = gr.HTML(None, html_template=VIEW_TEMPLATE, js_on_load=VIEW_JS, elem_id="wl-view",
                               css_template=(WEB_DIR / "gradio.css").read_text(encoding="utf-8"),
                               web_base=f"/gradio_api/file={WEB_DIR}")
            with gr.Column(scale=2, min_width=300):
                prompt = gr.Textbox(first_prompt, label="World prompt", max_lines=3,
                                    max_length=MAX_PROMPT_CHARS, elem_id="wl-prompt")
                apply = gr.Button("Apply prompt", variant="primary", elem_id="wl-apply")
                with gr.Row():
                    themes = [gr.Button(name, size="sm", elem_classes="wl-theme") for name, _ in
                              world.presets]
                with gr.Row():
                    new_world = gr.Button("New world", elem_id="wl-new-world")
                    reset = gr.Button("Reset", elem_id="wl-reset")
        demo.load(world.stream, inputs=prompt, outputs=view, concurrency_limit=None, api_name=False,
                  show_progress="hidden")
        view.input(world.set_keys, queue=False, api_name=False)
        apply.click(world.set_prompt, inputs=prompt, outputs=prompt, api_name="prompt")
        prompt.submit(world.set_prompt, inputs=prompt, outputs=prompt, api_name=False)
        for button, (_, text) in zip(themes, world.presets, strict=True):
            button.click(lambda t=text: t, outputs=prompt, queue=False, api_name=False).then(
                world.set_prompt, inputs=prompt, outputs=prompt, api_name=False)
        new_world.click(world.new_world, inputs=prompt, api_name="new_world")
        reset.click(world.reset, api_name="reset")
        demo.unload(world.leave)
    return demo


def launch(demo: gr.Blocks, *, host: str, port: int | None, share: bool = False,
           block: bool = True) -> tuple[Any, str]:
    """Start the Gradio server; returns (app, local URL). With ``block`` it serves until Ctrl-C."""
    demo.queue(default_concurrency_limit=None)
    theme = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")
    app, url, _ = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                              quiet=True, allowed_paths=[str(WEB_DIR)], js=DARK_MODE_JS, theme=theme,
                              footer_links=[])
    if block:
        demo.block_thread()
    return app, url
