// The live view of the Gradio app (app/gradio_app.py): mounted by its gr.HTML component's js_on_load, which
// passes Gradio's `element`, `props`, `trigger` and `watch`. The Python stream sets `props.value` to one frame
// at a time ({src: data URL, frame, key_seq, model, device, steps, seed}); key changes go back as `input` events.

import { HeldKeys } from "./input.js";
import { FrameView, StreamMeter } from "./view.js";

export function mount(element, props, trigger, watch) {
  const stage = element.querySelector(".wl-stage");
  const frames = new FrameView(element.querySelector("canvas"), stage);
  const meter = new StreamMeter();
  const state = { framesReceived: 0, framesDrawn: 0, keySeq: 0, keys: 0, lastFrame: null, fps: 0, latencyMs: null };
  window.worldloopGradio = state;
  const hud = (name, text) => {
    const el = element.querySelector(`[data-hud="${name}"]`);
    if (el && el.textContent !== String(text)) el.textContent = String(text);
  };

  stage.addEventListener("pointerdown", () => stage.focus());
  new HeldKeys((mask) => {
    state.keys = mask;
    state.keySeq += 1;
    meter.keyChange(state.keySeq, performance.now());
    trigger("input", { keys: mask, seq: state.keySeq });
  }).attach(element.querySelectorAll(".key[data-key]"));

  // Latest frame wins: while one frame decodes, newer ones replace the waiting one.
  let pending = null;
  let decoding = false;
  async function drain() {
    decoding = true;
    while (pending) {
      const src = pending;
      pending = null;
      try {
        const blob = await (await fetch(src)).blob();
        frames.draw(await createImageBitmap(blob));
        state.framesDrawn += 1;
      } catch (err) {
        console.warn("worldloop: could not decode a frame", err);
      }
    }
    decoding = false;
  }

  watch("value", () => {
    const v = props.value;
    if (!v || !v.src) return;
    state.framesReceived += 1;
    state.lastFrame = { frame: v.frame, keySeq: v.key_seq, seed: v.seed };
    meter.frame(performance.now(), v.key_seq);
    hud("model", v.model);
    hud("device", v.device);
    hud("steps", v.steps);
    hud("frame", v.frame);
    hud("seed", v.seed);
    pending = v.src;
    if (!decoding) drain();
  });

  setInterval(() => {
    state.fps = meter.fps(performance.now());
    state.latencyMs = meter.latency();
    hud("fps", state.fps);
    hud("latency", state.latencyMs === null ? "–" : `${Math.round(state.latencyMs)} ms`);
  }, 250);
}
