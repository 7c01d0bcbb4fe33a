"""``worldloop play``: start the server with the default model and open the game in your browser.

    worldloop play                       # assets/default, or random weights with a loud warning
    worldloop play --no-browser --port 9000
    worldloop play --model runs/student/model --device cuda --steps 2

This is ``worldloop serve`` with the defaults a player wants, plus opening the page; the URL is always
printed. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING

from worldloop.app.commands import serve
from worldloop.app.loading import add_model_options, choose_model
from worldloop.app.starts import add_start_options

if TYPE_CHECKING:
    from worldloop.streaming.server import WorldloopServer

DEFAULT_PORT = 8765


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("play", help="play the world model in your browser (starts the server)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s: local only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="port (default: %(default)s, or a free one if that is taken; 0: any free port)")
    p.add_argument("--no-browser", action="store_true", help="only print the URL")
    add_model_options(p)
    p.add_argument("--record-dir", type=Path, metavar="DIR",
                   help="where the page's Record button saves videos (default: a new temporary directory)")
    add_start_options(p)
    p.set_defaults(func=run)


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _open_browser(url: str) -> None:
    """Open the page without holding up the server; say so when there is no browser to open."""
    def attempt() -> None:
        try:
            opened = webbrowser.open(url, new=2)
        except Exception:  # a broken browser setup must not take the server down
            opened = False
        if not opened:
            print(f"worldloop play: could not open a browser here; open {url} yourself", flush=True)

    threading.Thread(target=attempt, name="worldloop-browser", daemon=True).start()


def serve_args(args: argparse.Namespace, port: int, record_dir: Path) -> argparse.Namespace:
    """The ``worldloop serve`` options for a ``play`` command line (serve checks and applies them)."""
    parser = argparse.ArgumentParser(prog="worldloop")
    serve.register(parser.add_subparsers(dest="command"))
    argv = ["serve", "--host", args.host, "--port", str(port), "--device", args.device,
            "--record-dir", str(record_dir)]
    if args.model is not None:
        argv += ["--model", args.model]
    if args.preset is not None:
        argv += ["--preset", args.preset]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    argv += ["--backend", args.backend]
    if args.start is not None:
        argv += ["--start", args.start]
    if args.first_frame is not None:
        argv += ["--first-frame", str(args.first_frame)]
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    choose_model(args.model, args.preset, fallback=True)  # a bad --model fails before the port is chosen
    port = args.port
    if port == DEFAULT_PORT and not _port_is_free(args.host, port):
        print(f"worldloop play: port {port} is taken; using a free port instead", file=sys.stderr, flush=True)
        port = 0

    record_dir = args.record_dir or Path(tempfile.mkdtemp(prefix="worldloop-recordings-"))

    def ready(server: WorldloopServer) -> None:
        url = server.url
        print(f"\n  worldloop is running: open {url}  (Ctrl-C stops it; recordings go to {record_dir})\n",
              flush=True)
        if not args.no_browser:
            _open_browser(url)

    return serve.run(serve_args(args, port, record_dir), on_ready=ready)
