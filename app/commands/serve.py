"""``worldloop serve``: stream the world model to browsers and programs over a websocket.

    worldloop serve                        # assets/default, or random weights with a warning
    worldloop serve --preset tiny --port 0 --record-dir runs/recordings
    WORLDLOOP_TOKEN=$(openssl rand -hex 16) worldloop serve --host 0.0.0.0 --allow-origin https://example.org

The browser client (app/web) is served at ``/``; the websocket is ``/ws`` (docs/protocol.md); health and
metrics at ``/healthz`` and ``/metrics``. SIGTERM or Ctrl-C shuts down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from worldloop.app.errors import UserError
from worldloop.app.loading import (
    CPU_THREADS_RULE,
    ModelChoice,
    add_model_options,
    choose_model,
    load_model,
    torch_threads,
)
from worldloop.app.starts import add_start_options, starts_from_args

if TYPE_CHECKING:
    from worldloop.models.world_model import WorldModel
    from worldloop.streaming.config import ServerConfig
    from worldloop.streaming.engine import Engine
    from worldloop.streaming.server import WorldloopServer

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="stream the world model to browsers and programs (websocket)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s: local only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port; default: %(default)s)")
    add_model_options(p)
    p.add_argument("--fps", type=int, help="frames per second per session (default: the model's)")
    p.add_argument("--max-sessions", type=int, default=4, help="concurrent sessions (default: %(default)s)")
    p.add_argument("--threads", type=int,
                   help=f"torch CPU threads (default on the CPU: {CPU_THREADS_RULE}, measured fastest for "
                        "the default model on 2-core machines; on a GPU: torch's)")
    p.add_argument("--token", default=os.environ.get("WORLDLOOP_TOKEN"),
                   help="require this access token: 'Authorization: Bearer TOKEN' from programs, typed into "
                        "the page by browsers; 8+ characters from A-Z a-z 0-9 !#$%%&'*+-.^_`|~ (default: "
                        "$WORLDLOOP_TOKEN; prefer the variable: a command line is visible to other users)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin to allow besides this server's own and localhost ('*': any); "
                        "its host name may then also be used to reach the server; repeatable")
    p.add_argument("--record-dir", type=Path, help="where `record` writes MP4s (recording is off without it)")
    p.add_argument("--web-dir", type=Path, default=WEB_DIR, help="static files of the browser client")
    p.add_argument("--resume-grace", type=float, default=10.0,
                   help="seconds a dropped connection's session waits to be resumed (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="open websocket connections in all (default: %(default)s)")
    p.add_argument("--max-connections-per-ip", type=int, default=16,
                   help="open websocket connections from one client address (default: %(default)s)")
    p.add_argument("--start-deadline", type=float, default=10.0,
                   help="seconds a connection may stay open without a session (default: %(default)s)")
    p.add_argument("--no-speculative", action="store_true", help="do not generate frames ahead of time")
    add_start_options(p, what="a session that asks for no start")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.max_sessions < 1:
        raise UserError(f"--max-sessions must be ≥ 1, got {args.max_sessions}")
    if args.steps is not None and not 1 <= args.steps <= 8:
        raise UserError(f"--steps must be in 1..8, got {args.steps}")
    if args.fps is not None and not 1 <= args.fps <= 60:
        raise UserError(f"--fps must be in 1..60, got {args.fps}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be ≥ 1, got {args.threads}")
    if args.max_connections < 1 or args.max_connections_per_ip < 1:
        raise UserError("--max-connections and --max-connections-per-ip must be ≥ 1")
    if not args.start_deadline > 0:
        raise UserError(f"--start-deadline must be > 0 seconds, got {args.start_deadline}")
    if args.token is not None:
        from worldloop.streaming.protocol import check_access_token

        try:
            check_access_token(args.token)
        except ValueError as err:
            raise UserError(f"--token (or WORLDLOOP_TOKEN): {err}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(args: argparse.Namespace) -> tuple[ModelChoice, Engine, ServerConfig]:
    """Check the options and load the model: its choice, the engine on it (not started), the server config."""
    from worldloop.streaming.engine import Engine

    _check_args(args)
    choice = choose_model(args.model, args.preset, fallback=True)
    starts = starts_from_args(args, choice.config)  # a bad --first-frame fails before the model loads
    if choice.warning():
        print(f"\n{'!' * 100}\n{choice.warning()}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    if not _is_loopback(args.host) and args.token is None:
        print(f"worldloop serve: warning: listening on {args.host} without a token; anyone who can reach "
              "this port can use the model (set WORLDLOOP_TOKEN)", file=sys.stderr, flush=True)
    threads = torch_threads(args.device, args.threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    model = load_model(choice, device=args.device, steps=args.steps, max_sessions=args.max_sessions,
                       backend=args.backend, background=True)
    engine = Engine(model, max_sessions=args.max_sessions, fps=args.fps, speculative=not args.no_speculative,
                    trained=choice.trained, starts=starts)
    hint = float32_hint(model)
    if hint:
        print(f"worldloop serve: {hint}", file=sys.stderr, flush=True)
    return choice, engine, server_config(args)


def float32_hint(model: WorldModel) -> str | None:
    """What to tell a player whose CPU runs the model in float32 with PyTorch (no native bf16): ONNX Runtime's
    int8 graphs play faster there (an AVX2 2-core CPU: 1.4× PyTorch, docs/onnx.md), None otherwise."""
    import torch

    if (model.device.type != "cpu" or model.backend != "torch" or model.dtype != torch.float32
            or model.pending_backend is not None):
        return None
    return ("this CPU has no native bf16, so the model runs in float32 (about 20 FPS on 2 cores); ONNX "
            "Runtime's int8 graphs play faster here (28 FPS): pip install 'worldloop[onnx]', then "
            "--backend auto (the default) or --backend onnxruntime-int8 runs them")


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The server's settings from the command line (checked by ``_check_args``)."""
    from worldloop.streaming.config import ServerConfig

    return ServerConfig(host=args.host, port=args.port, token=args.token,
                        allowed_origins=tuple(args.allow_origin), web_dir=args.web_dir,
                        record_dir=args.record_dir, resume_grace_s=args.resume_grace,
                        max_connections=args.max_connections,
                        max_connections_per_ip=args.max_connections_per_ip,
                        start_deadline_s=args.start_deadline)


def run(args: argparse.Namespace, on_ready: Callable[[WorldloopServer], None] | None = None) -> int:
    """Serve until SIGTERM/Ctrl-C; ``on_ready`` runs once listening (``worldloop play`` opens a browser)."""
    from worldloop.streaming.server import run_server

    choice, engine, config = build(args)

    def ready(server: WorldloopServer) -> None:
        print(f"worldloop serve: {server.url} (websocket {server.url.replace('http', 'ws', 1)}ws) — model "
              f"{choice.source} on {engine.device}, {engine.steps} step(s) per frame, {engine.fps} FPS, "
              f"up to {engine.max_sessions} sessions", flush=True)
        if on_ready is not None:
            on_ready(server)

    engine.start()
    try:
        asyncio.run(run_server(engine, config, on_ready=ready))
    finally:
        engine.close()
    print("worldloop serve: stopped", flush=True)
    return 0
