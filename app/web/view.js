// Drawing frames on the canvas, the HUD numbers and the toasts. No networking here.

export class FrameView {
  /** @param {HTMLCanvasElement} canvas  @param {HTMLElement} stage */
  constructor(canvas, stage) {
    this.canvas = canvas;
    this.stage = stage;
    this.ctx = canvas.getContext("2d", { alpha: false });
    this.smooth = false;
    this.last = null; // the last drawn ImageBitmap, kept for redraws on resize and thumbnails
    new ResizeObserver(() => this.resize()).observe(stage);
    this.resize();
  }

  /** Match the stage's aspect ratio to the stream's frame size. */
  setFrameSize(width, height) {
    this.stage.style.aspectRatio = `${width} / ${height}`;
  }

  setSmooth(smooth) {
    this.smooth = smooth;
    this.redraw();
  }

  resize() {
    // The backing store follows the on-screen size, so scaling happens once, in drawImage, under our control
    // (nearest-neighbour keeps low-resolution frames crisp instead of the browser's blurry upscale).
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(this.stage.clientWidth * dpr));
    const h = Math.max(1, Math.round(this.stage.clientHeight * dpr));
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w;
      this.canvas.height = h;
      this.redraw();
    }
  }

  /** Draw a decoded frame; takes ownership of the bitmap. */
  draw(bitmap) {
    if (this.last) this.last.close();
    this.last = bitmap;
    this.redraw();
  }

  redraw() {
    const { ctx, canvas, last } = this;
    ctx.imageSmoothingEnabled = this.smooth;
    ctx.imageSmoothingQuality = "high";
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!last) return;
    const scale = Math.min(canvas.width / last.width, canvas.height / last.height);
    const w = Math.round(last.width * scale);
    const h = Math.round(last.height * scale);
    ctx.drawImage(last, (canvas.width - w) >> 1, (canvas.height - h) >> 1, w, h);
  }

  /** A small PNG data URL of the current frame (for the snapshot list). */
  thumbnail(size = 48) {
    if (!this.last) return "";
    const c = document.createElement("canvas");
    c.width = c.height = size;
    const ctx = c.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(this.last, 0, 0, size, size);
    return c.toDataURL("image/png");
  }
}

/** Frames per second over a sliding one-second window, and key-to-frame latency. */
export class StreamMeter {
  constructor() {
    this.arrivals = [];
    this.pendingKeys = []; // [seq, time] of key changes not yet seen applied in a frame
    this.latencies = [];
  }

  frame(now, keySeq) {
    this.arrivals.push(now);
    while (this.arrivals.length && now - this.arrivals[0] > 1000) this.arrivals.shift();
    let applied = null;
    while (this.pendingKeys.length && this.pendingKeys[0][0] <= keySeq) applied = this.pendingKeys.shift();
    if (applied) {
      this.latencies.push(now - applied[1]);
      if (this.latencies.length > 20) this.latencies.shift();
    }
  }

  keyChange(seq, now) {
    this.pendingKeys.push([seq, now]);
    if (this.pendingKeys.length > 64) this.pendingKeys.shift();
  }

  fps(now) {
    while (this.arrivals.length && now - this.arrivals[0] > 1000) this.arrivals.shift();
    return this.arrivals.length;
  }

  /** Median of the last 20 latencies in ms, or null before the first key change. */
  latency() {
    if (!this.latencies.length) return null;
    const sorted = [...this.latencies].sort((a, b) => a - b);
    return sorted[sorted.length >> 1];
  }
}

export function setText(id, text) {
  const el = document.getElementById(id);
  if (el && el.textContent !== String(text)) el.textContent = String(text);
}

/** Show a message at the bottom of the page for a few seconds. */
export function toast(message, kind = "error", ms = 5000) {
  const box = document.getElementById("toasts");
  const el = document.createElement("div");
  el.className = `toast ${kind}`;
  el.textContent = message;
  box.append(el);
  while (box.children.length > 4) box.firstElementChild.remove();
  setTimeout(() => el.remove(), ms);
}
