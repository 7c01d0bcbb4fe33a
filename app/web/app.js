// worldloop browser client: speaks websocket protocol v1 (docs/CONTRACTS.md, docs/protocol.md) with the server
// that serves this page. Frames arrive as binary messages (24-byte header + JPEG/WebP), everything else is JSON.
// Test hooks and live numbers are exposed on window.worldloop.

import { HeldKeys } from "./input.js";
import { FrameView, StreamMeter, setText, toast } from "./view.js";

const HEADER_BYTES = 24;
const MAGIC = "WLF1";
const SUBPROTOCOL = "worldloop.v1";
// A server started with a token wants it; the page keeps the one typed in for this tab only, never in the URL.
const TOKEN_STORAGE = "worldloop.token";
const TOKEN_CHARS = /^[0-9A-Za-z!#$%&'*+.^_`|~-]{8,256}$/; // a websocket subprotocol's characters (RFC 6455)

// Theme presets: one prompt per theme of the built-in world, worded exactly as the world describes itself
// (themes.json is checked against distill/world/themes.py by tests/test_web_client.py).
const THEMES = await fetch("themes.json").then((r) => r.json()).catch(() => []);
// The first preset is the world a newcomer sees: a bright theme (FIRST_THEME in app/gradio_app.py).
const DEFAULT_PROMPT = THEMES[0]?.prompt ?? "a softly lit ice cave of rough blue rock walls";

const params = new URLSearchParams(location.search);
const randomSeed = () => Math.floor(Math.random() * 2 ** 31);
const state = {
  framesReceived: 0,
  framesDrawn: 0,
  lastHeader: null,
  session: null,
  ready: null,
  prompt: params.get("prompt") || DEFAULT_PROMPT,
  seed: params.has("seed") ? Number(params.get("seed")) : randomSeed(),
  keySeq: 0,
  keys: 0,
  fps: 0,
  latencyMs: null,
  connected: false,
  errors: [],
  messages: [], // the last JSON messages from the server, newest last
  confirmed: null, // the last `ok` reply: {request, frame} — frames from `frame` on reflect the change
  snapshots: [],
  reconnect: true,
};
window.worldloop = state;

const view = new FrameView(document.getElementById("view"), document.getElementById("stage"));
const meter = new StreamMeter();
let socket = null;
let retries = 0;
let retryTimer = null;
let pending = null; // the newest frame not yet decoded; older ones are dropped (latest frame wins)
let decoding = false;

function send(type, body = {}) {
  if (socket?.readyState !== WebSocket.OPEN) return false;
  socket.send(JSON.stringify({ type, ...body }));
  return true;
}
state.send = send;
Object.defineProperty(state, "socket", { get: () => socket }); // for tests: simulate a network blip

// ---- connection --------------------------------------------------------------------------------------------

function connect() {
  clearTimeout(retryTimer);
  setStatus("connecting", state.session ? "reconnecting…" : "connecting…");
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  const token = sessionStorage.getItem(TOKEN_STORAGE);
  // Browsers cannot set headers on a websocket, so the token is offered as a second subprotocol; the server
  // checks it and answers with "worldloop.v1" alone.
  socket = new WebSocket(url, token ? [SUBPROTOCOL, `worldloop.token.${token}`] : [SUBPROTOCOL]);
  socket.binaryType = "arraybuffer";
  let opened = false;
  socket.onopen = () => {
    opened = true;
    sendStart();
  };
  socket.onmessage = (e) => (typeof e.data === "string" ? onJson(JSON.parse(e.data)) : onFrame(e.data));
  socket.onclose = async (e) => {
    state.connected = false;
    if (!state.reconnect) return;
    if (!opened && (await tokenRefused(token))) {
      askForToken(token !== null);
      return;
    }
    // Exponential backoff with jitter, resuming the same session on the next start.
    const delay = Math.min(10000, 500 * 2 ** retries) * (0.75 + Math.random() * 0.5);
    retries += 1;
    setStatus("offline", `disconnected${e.reason ? `: ${e.reason}` : ""} — retrying in ${(delay / 1000).toFixed(1)} s`);
    retryTimer = setTimeout(connect, delay);
  };
}

// A refused handshake looks like any network failure to the page: ask the same endpoint over plain HTTP, with
// the token as a header, whether the answer is 401 (unauthorized).
async function tokenRefused(token) {
  try {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    return (await fetch("/ws", { headers, cache: "no-store" })).status === 401;
  } catch {
    return false; // the server is unreachable: keep retrying
  }
}

function askForToken(refused) {
  setStatus("offline", "this server needs an access token");
  const note = refused ? "That access token was refused; try again." : "This server needs an access token.";
  setText("token-note", note);
  document.getElementById("token-form").hidden = false;
  document.getElementById("token").focus();
}

function submitToken(e) {
  e.preventDefault();
  const input = document.getElementById("token");
  const token = input.value.trim();
  if (!TOKEN_CHARS.test(token)) {
    setText("token-note", "A token is 8 or more letters, digits or ! # $ % & ' * + - . ^ _ ` | ~");
    return;
  }
  sessionStorage.setItem(TOKEN_STORAGE, token);
  input.value = "";
  document.getElementById("token-form").hidden = true;
  retries = 0;
  connect();
}

/** Recordings behind a token need it as a header, which a plain link cannot send. */
async function download(url, name) {
  const token = sessionStorage.getItem(TOKEN_STORAGE);
  const response = await fetch(url, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
  if (!response.ok) return toast(`The download failed (HTTP ${response.status}).`);
  const href = URL.createObjectURL(await response.blob());
  Object.assign(document.createElement("a"), { href, download: name }).click();
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
  return undefined;
}

function sendStart() {
  const start = { prompt: state.prompt, seed: state.seed, format: params.get("format") || "jpeg" };
  for (const name of ["fps", "steps", "quality"]) if (params.has(name)) start[name] = Number(params.get(name));
  if (state.session) start.session = state.session;
  send("start", start);
}

function onJson(msg) {
  state.messages.push(msg);
  if (state.messages.length > 50) state.messages.shift();
  switch (msg.type) {
    case "ready": return onReady(msg);
    case "ok":
      state.confirmed = msg;
      if (msg.request === "prompt") toast(`Prompt applied from frame ${msg.frame}.`, "info", 2500);
      return undefined;
    case "error": return onError(msg);
    case "snapshot": return addSnapshot(msg);
    case "recording": return onRecording(msg);
    case "bye": return onBye(msg);
    default: return undefined;
  }
}

function onError(msg) {
  state.errors.push(msg);
  if (msg.code === "unknown_session") {
    // The session expired while we were away: start a fresh one with the same prompt and seed.
    state.session = null;
    toast("The previous session has expired; starting a new one.", "info");
    return sendStart();
  }
  return toast(msg.message || msg.code);
}

function onBye(msg) {
  if (msg.reason === "replaced") {
    state.reconnect = false; // another tab took this session over; reconnecting would take it back
    setStatus("offline", "this session continues in another window");
  } else {
    setStatus("offline", `server ended the session (${msg.reason})`);
  }
}

function onReady(msg) {
  const resumed = msg.resumed;
  state.ready = msg;
  state.session = msg.session;
  state.connected = true;
  retries = 0;
  document.getElementById("token-form").hidden = true;
  view.setFrameSize(msg.width, msg.height);
  setText("hud-model", msg.model);
  setText("hud-device", msg.device);
  setText("hud-steps", msg.steps);
  document.getElementById("untrained").hidden = msg.trained !== false; // random weights: the pictures are noise
  setText("seed", state.seed);
  setStatus("live", resumed ? "live (resumed)" : "live");
  document.getElementById("prompt").value = state.prompt;
  markTheme();
  if (state.keys) sendKeys(state.keys); // the server may have missed a change while we were away
}

function setStatus(kind, text) {
  const el = document.getElementById("status");
  el.dataset.state = kind;
  el.textContent = text;
  const overlay = document.getElementById("overlay");
  overlay.hidden = kind === "live" && state.framesDrawn > 0;
  if (kind !== "live") overlay.textContent = text;
}

// ---- frames ------------------------------------------------------------------------------------------------

function onFrame(buffer) {
  if (buffer.byteLength < HEADER_BYTES) return;
  const dv = new DataView(buffer);
  const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
  if (magic !== MAGIC) return;
  const header = {
    frame: dv.getUint32(4, true),
    keySeq: dv.getUint32(8, true),
    width: dv.getUint16(12, true),
    height: dv.getUint16(14, true),
    serverTimeMs: dv.getFloat64(16, true),
  };
  const now = performance.now();
  state.framesReceived += 1;
  state.lastHeader = header;
  meter.frame(now, header.keySeq);
  const type = state.ready?.format === "webp" ? "image/webp" : "image/jpeg";
  if (pending) send("ack", { frame: pending.header.frame }); // superseded before it was drawn
  pending = { header, blob: new Blob([new Uint8Array(buffer, HEADER_BYTES)], { type }) };
  if (!decoding) drainFrames();
}

async function drainFrames() {
  decoding = true;
  while (pending) {
    const { header, blob } = pending;
    pending = null;
    try {
      view.draw(await createImageBitmap(blob));
      state.framesDrawn += 1;
      if (state.framesDrawn === 1) document.getElementById("overlay").hidden = true;
    } catch (err) {
      state.errors.push({ code: "decode", message: String(err) });
    }
    send("ack", { frame: header.frame });
  }
  decoding = false;
}

// ---- keys, prompt, world controls --------------------------------------------------------------------------

function sendKeys(mask) {
  state.keys = mask;
  state.keySeq += 1;
  meter.keyChange(state.keySeq, performance.now());
  send("keys", { keys: mask, seq: state.keySeq });
}

function setPrompt(prompt) {
  prompt = prompt.trim();
  if (!prompt) return toast("Type a prompt first.", "info");
  state.prompt = prompt;
  document.getElementById("prompt").value = prompt;
  markTheme();
  if (!send("prompt", { prompt })) toast("Not connected; the prompt will apply when the stream resumes.", "info");
}

function markTheme() {
  for (const b of document.querySelectorAll("#themes button")) {
    b.classList.toggle("active", b.dataset.prompt === state.prompt);
  }
}

function setupControls() {
  const themes = document.getElementById("themes");
  for (const { theme: label, prompt } of THEMES) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.dataset.prompt = prompt;
    b.title = prompt;
    b.addEventListener("click", () => setPrompt(prompt));
    themes.append(b);
  }
  const form = document.getElementById("prompt-form");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    setPrompt(document.getElementById("prompt").value);
    document.getElementById("stage").focus();
  });
  // The box shows the current prompt. Focusing it selects all of it, so what the player types replaces the
  // prompt instead of landing in the middle of it; the mouseup of the click that focused the box would
  // otherwise drop the selection where the caret lands. Clicks into an already focused box edit as usual.
  const box = document.getElementById("prompt");
  let focusingClick = false;
  box.addEventListener("mousedown", () => { focusingClick = document.activeElement !== box; });
  box.addEventListener("focus", () => box.select());
  box.addEventListener("mouseup", (e) => {
    if (focusingClick) e.preventDefault();
    focusingClick = false;
  });
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  document.getElementById("new-world").addEventListener("click", () => {
    state.seed = randomSeed();
    setText("seed", state.seed);
    send("reset", { seed: state.seed, prompt: state.prompt });
  });
  document.getElementById("reset").addEventListener("click", () => send("reset", {}));
  document.getElementById("snapshot").addEventListener("click", () => send("snapshot", {}));
  document.getElementById("record").addEventListener("click", () => {
    const recording = document.getElementById("record").getAttribute("aria-pressed") === "true";
    send("record", { action: recording ? "stop" : "start" });
  });
  document.getElementById("token-form").addEventListener("submit", submitToken);
  document.getElementById("smooth").addEventListener("change", (e) => view.setSmooth(e.target.checked));
  const stage = document.getElementById("stage");
  stage.addEventListener("pointerdown", () => stage.focus());
  new HeldKeys(sendKeys).attach(document.querySelectorAll(".key[data-key]"));
}

function addSnapshot(msg) {
  state.snapshots.push(msg);
  document.getElementById("snapshots-empty").hidden = true;
  const li = document.createElement("li");
  const img = document.createElement("img");
  img.alt = "";
  img.src = view.thumbnail();
  const label = document.createElement("span");
  label.textContent = `frame ${msg.frame}`;
  const rewind = document.createElement("button");
  rewind.type = "button";
  rewind.textContent = "Rewind";
  rewind.addEventListener("click", () => send("restore", { id: msg.id }));
  li.append(img, label, rewind);
  document.getElementById("snapshots").prepend(li);
}

function onRecording(msg) {
  const active = msg.state === "started";
  const button = document.getElementById("record");
  button.setAttribute("aria-pressed", String(active));
  button.textContent = active ? "Stop recording" : "Start recording";
  document.getElementById("rec-badge").hidden = !active;
  if (!active) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = `${msg.frames} frames`;
    const link = document.createElement("a");
    link.href = msg.url;
    link.download = msg.name;
    link.textContent = "Download";
    link.addEventListener("click", (e) => {
      if (!sessionStorage.getItem(TOKEN_STORAGE)) return; // the plain link works
      e.preventDefault();
      download(msg.url, msg.name);
    });
    li.append(label, link);
    document.getElementById("recordings").prepend(li);
  }
}

function updateHud() {
  const now = performance.now();
  state.fps = meter.fps(now);
  state.latencyMs = meter.latency();
  setText("hud-fps", state.connected ? state.fps : "–");
  setText("hud-latency", state.latencyMs === null ? "–" : `${Math.round(state.latencyMs)} ms`);
  setText("hud-frame", state.lastHeader ? state.lastHeader.frame : "–");
}

setupControls();
setInterval(updateHud, 250);
connect();
