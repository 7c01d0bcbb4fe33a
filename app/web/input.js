// Held-key tracking: keyboard (WASD, Q/E, arrows) and on-screen buttons (pointer events, hold to press).
// The key order and aliases mirror models/keys.py: bit i of the mask is KEYS[i].

export const KEYS = ["forward", "back", "left", "right", "turn_left", "turn_right"];

// Physical key positions (KeyboardEvent.code), so WASD works on any keyboard layout.
const CODES = {
  KeyW: "forward", KeyS: "back", KeyA: "left", KeyD: "right", KeyQ: "turn_left", KeyE: "turn_right",
  ArrowUp: "forward", ArrowDown: "back", ArrowLeft: "turn_left", ArrowRight: "turn_right",
};

function isTyping(target) {
  return target instanceof HTMLElement &&
    (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

export class HeldKeys {
  /** @param {(mask: number) => void} onChange  called whenever the set of held keys changes */
  constructor(onChange) {
    this.onChange = onChange;
    this.codes = new Set(); // keyboard codes held
    this.pointers = new Map(); // pointerId -> key name held through an on-screen button
    this.mask = 0;
  }

  attach(buttons) {
    window.addEventListener("keydown", (e) => this.keydown(e));
    window.addEventListener("keyup", (e) => this.keyup(e));
    window.addEventListener("blur", () => this.releaseAll());
    document.addEventListener("visibilitychange", () => { if (document.hidden) this.releaseAll(); });
    for (const button of buttons) this.attachButton(button);
  }

  attachButton(button) {
    const key = button.dataset.key;
    const press = (e) => {
      e.preventDefault();
      button.setPointerCapture?.(e.pointerId);
      this.pointers.set(e.pointerId, key);
      this.update();
    };
    const release = (e) => {
      if (this.pointers.delete(e.pointerId)) this.update();
    };
    button.addEventListener("pointerdown", press);
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) button.addEventListener(type, release);
    button.addEventListener("contextmenu", (e) => e.preventDefault());
  }

  keydown(e) {
    const key = CODES[e.code];
    if (!key || e.ctrlKey || e.metaKey || e.altKey || isTyping(e.target)) return;
    e.preventDefault(); // arrows would scroll the page
    if (!this.codes.has(e.code)) {
      this.codes.add(e.code);
      this.update();
    }
  }

  keyup(e) {
    if (this.codes.delete(e.code)) this.update();
  }

  releaseAll() {
    this.codes.clear();
    this.pointers.clear();
    this.update();
  }

  held() {
    const names = new Set([...this.codes].map((c) => CODES[c]));
    for (const key of this.pointers.values()) names.add(key);
    return names;
  }

  update() {
    const names = this.held();
    let mask = 0;
    KEYS.forEach((k, i) => { if (names.has(k)) mask |= 1 << i; });
    for (const b of document.querySelectorAll(".key[data-key]")) b.classList.toggle("held", names.has(b.dataset.key));
    if (mask !== this.mask) {
      this.mask = mask;
      this.onChange(mask);
    }
  }
}
