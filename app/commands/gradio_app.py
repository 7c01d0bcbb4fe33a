"""``worldloop gradio``: the world model in a Gradio app (app/gradio_app.py), on the same streaming engine.

    worldloop gradio                      # http://127.0.0.1:7860, assets/default or random weights
    worldloop gradio --preset tiny --port 0

Local only by default; ``--share`` asks Gradio for a public link (needs internet access). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import sys

from worldloop.app.errors import UserError
from worldloop.app.loading import add_model_options, choose_model, load_model
from worldloop.app.starts import add_start_options, starts_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gradio", help="the world model in a Gradio app",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s: local only)")
    p.add_argument("--port", type=int, default=7860, help="port (0: any free port; default: %(default)s)")
    p.add_argument("--share", action="store_true", help="create a public Gradio link (off by default)")
    add_model_options(p)
    p.add_argument("--fps", type=int, help="frames per second per session (default: the model's)")
    p.add_argument("--max-sessions", type=int, default=4, help="concurrent sessions (default: %(default)s)")
    add_start_options(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.steps is not None and not 1 <= args.steps <= 8:
        raise UserError(f"--steps must be in 1..8, got {args.steps}")
    if args.fps is not None and not 1 <= args.fps <= 60:
        raise UserError(f"--fps must be in 1..60, got {args.fps}")
    if args.max_sessions < 1:
        raise UserError(f"--max-sessions must be ≥ 1, got {args.max_sessions}")


def run(args: argparse.Namespace) -> int:
    from worldloop.app.gradio_app import GradioWorld, build_app, launch
    from worldloop.streaming.engine import Engine

    _check_args(args)
    choice = choose_model(args.model, args.preset, fallback=True)
    starts = starts_from_args(args, choice.config)
    if choice.warning():
        print(f"\n{'!' * 100}\n{choice.warning()}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    model = load_model(choice, device=args.device, steps=args.steps, max_sessions=args.max_sessions,
                       backend=args.backend, background=True)
    engine = Engine(model, max_sessions=args.max_sessions, fps=args.fps, trained=choice.trained,
                    starts=starts).start()
    demo = build_app(GradioWorld(engine))
    try:
        _, url = launch(demo, host=args.host, port=args.port or None, share=args.share, block=False)
        print(f"worldloop gradio: {url} — model {choice.source} on {engine.device}, {engine.steps} step(s) "
              f"per frame, {engine.fps} FPS, up to {engine.max_sessions} sessions (Ctrl-C stops it)",
              flush=True)
        demo.block_thread()
    finally:
        demo.close()
        engine.close()
    return 0
