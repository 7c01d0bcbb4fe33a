"""Frames per second as the browser sees them: a real ``worldloop serve`` subprocess, the real web client in
headless Chromium (Playwright), frames counted by the page itself over a fixed time while W is held.

    python benchmarks/browser_fps.py --preset default --seconds 10
    python benchmarks/browser_fps.py --model assets/default --screenshot docs/screenshots/web.png

Prints one JSON line naming the hardware. Needs Debian's ``chromium`` (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from worldloop.models.timing import cpu_name

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server at {url} did not become healthy in {timeout:.0f} s")




def measure(url: str, seconds: float, screenshot: str | None = None) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("browser_fps: no chromium binary found (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.wait_for_function("window.worldloop && window.worldloop.framesReceived > 10", timeout=60_000)
        page.locator("canvas").first.click()
        page.keyboard.down("w")
        start = page.evaluate("window.worldloop.framesReceived")
        time.sleep(seconds)
        end = page.evaluate("window.worldloop.framesReceived")
        page.keyboard.up("w")
        latency = page.evaluate("window.worldloop.latencyMs ?? null")
        if screenshot:  # the page as a player sees it after walking forward for the measurement
            page.screenshot(path=screenshot)
        browser.close()
    return {"fps": (end - start) / seconds, "frames": end - start, "hud_latency_ms": latency}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="serve this preset (random weights)")
    parser.add_argument("--model", help="serve this model directory instead")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--screenshot", metavar="PNG", help="also save a screenshot of the page at the end")
    args = parser.parse_args()
    port = free_port()
    source = ["--model", args.model] if args.model else ["--preset", args.preset]
    command = [sys.executable, "-m", "worldloop.app.cli", "serve", "--port", str(port), *source]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        result = measure(url, args.seconds, args.screenshot)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result.update(model=args.model or f"preset {args.preset}", seconds=args.seconds, cpu=cpu_name(),
                  cores=os.cpu_count(), load_average=os.getloadavg(), date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
