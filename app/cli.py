"""The ``worldloop`` command line: one entry point, one module per command group.

Each command module exposes ``register(subparsers)`` which adds its subcommand(s) and sets
``func(args) -> int`` on the parser. A subcommand is listed here only once its feature works.
Errors a user can fix (bad paths, bad options, bad checkpoints) raise ``UserError`` (``app/errors.py``) and
are printed as a single line with exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from worldloop.app.errors import user_error_types

# Command modules, in the order their groups appear in ``worldloop --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "worldloop.app.commands.play",
    "worldloop.app.commands.serve",
    "worldloop.app.commands.gradio_app",
    "worldloop.app.commands.rollout",
    "worldloop.app.commands.world",
    "worldloop.app.commands.train",
    "worldloop.app.commands.distill",
    "worldloop.app.commands.eval",
    "worldloop.app.commands.export",
    "worldloop.app.commands.speedrun",
    "worldloop.app.commands.gpu_check",
    "worldloop.app.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldloop",
        description="worldloop: a real-time interactive world model you can play in the browser.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP's default busy-wait makes two torch threads stall for ~16 ms on small ops whenever another
    # process is busy (measured: up to 20x slower frames on a 2-core machine). It must be set before torch
    # initialises OpenMP, i.e. before the command modules import torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except user_error_types() as err:
        print(f"worldloop {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"worldloop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
