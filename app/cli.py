"""The ``worldloop`` command line: one entry point, one module per command group.

Each command module exposes ``register(subparsers)`` which adds its subcommand(s) and sets
``func(args) -> int`` on the parser. A subcommand is listed here only once its feature works.
Errors a user can fix (bad paths, bad options, bad checkpoints) raise ``UserError`` (``app/errors.py``) and
are printed as a single line with exit status 2; any other exception is a bug and keeps its traceback.

What every command shares is added here, once: ``--log-level`` on every command, the one device resolver
(``models/device.py``) applied to ``--device`` before the command runs, and the help formatter. A command's
module is imported only when that command runs (or its help is asked for), so ``worldloop --help`` and
``worldloop --version`` never load torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Collection, Iterator
from importlib.metadata import PackageNotFoundError, version

from worldloop.app.errors import UserError, user_error_types

# Command name → (its module, its line in ``worldloop --help``), in the order of ``worldloop --help``.
# The line is the one the module registers (tests/test_cli.py checks that they agree).
COMMANDS: dict[str, tuple[str, str]] = {
    "play": ("worldloop.app.commands.play", "play the world model in your browser (starts the server)"),
    "serve": ("worldloop.app.commands.serve", "stream the world model to browsers and programs (websocket)"),
    "gradio": ("worldloop.app.commands.gradio_app", "the world model in a Gradio app"),
    "rollout": ("worldloop.app.commands.rollout", "roll the model out offline into an MP4 video"),
    "world": ("worldloop.app.commands.world", "the built-in world: record episodes, list themes"),
    "train": ("worldloop.app.commands.train", "train the autoencoder, the teacher or the eval helpers"),
    "distill": ("worldloop.app.commands.distill", "distil the teacher into a 1–2-step student"),
    "eval": ("worldloop.app.commands.eval",
             "evaluate models against the engine (PSNR, keys, prompts, drift)"),
    "looks": ("worldloop.app.commands.looks", "build a model's bank of looks (a new prompt's first texture)"),
    "export": ("worldloop.app.commands.export", "write the shipping form of a model directory, or ONNX"),
    "speedrun": ("worldloop.app.commands.speedrun", "train a playable model end to end within a time budget"),
    "gpu-check": ("worldloop.app.commands.gpu_check",
                  "CUDA checks, then a speedrun, in one bounded call (scripts/gpu_check.sh)"),
    "bench": ("worldloop.app.commands.bench", "measure speed, latency and memory of a model on this machine"),
}
LOG_LEVELS = ("debug", "info", "warning", "error")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (the command docstrings); an option's default is appended to its help unless
    the help already speaks of its default or there is nothing to say (no value, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS or not action.option_strings
        if quiet or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def version_text() -> str:
    try:
        return f"worldloop {version('worldloop')}"
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "worldloop (not installed)"


def build_parser(commands: Collection[str] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The parser with the real (sub)commands of ``commands``; the others are listed with their help line,
    their modules not imported."""
    parser = argparse.ArgumentParser(
        prog="worldloop", formatter_class=HelpFormatter,
        description="worldloop: a real-time interactive world model you can play in the browser.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, line) in COMMANDS.items():
        if name in commands:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=line, add_help=False)
    for sub in command_parsers(parser):
        sub.formatter_class = HelpFormatter
        if sub.get_default("func") is not None:
            sub.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                             help="worldloop's own messages from this level up; other libraries' from "
                                  "warning up, or everything with debug (default: %(default)s)")
    return parser


def command_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every (sub)command parser below ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from command_parsers(sub)


def configure_logging(level: str) -> None:
    """worldloop's loggers at ``level``; other libraries (websockets logs every HTTP request at info, gradio's
    HTTP client every call) at warning, unless ``level`` is debug."""
    root_level = logging.DEBUG if level == "debug" else max(logging.WARNING, getattr(logging, level.upper()))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(root_level)
    logging.getLogger("worldloop").setLevel(level.upper())


def resolve_device_option(name: str) -> str:
    """``--device`` → the device a command runs on (``auto``: CUDA when available, else the CPU)."""
    from worldloop.models.device import resolve_device

    try:
        return str(resolve_device(name))
    except ValueError as err:
        raise UserError(str(err)) from None


def _chosen_commands(argv: list[str]) -> list[str]:
    """The command named on the command line (the first word that is not an option), if any."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return [first] if first in COMMANDS else []


def main(argv: list[str] | None = None) -> int:
    # OpenMP's default busy-wait makes two torch threads stall for ~16 ms on small ops whenever another
    # process is busy (measured: up to 20x slower frames on a 2-core machine). It must be set before torch
    # initialises OpenMP, i.e. before the command modules import torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_chosen_commands(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level)
    try:
        if getattr(args, "device", None) is not None:
            args.device = resolve_device_option(args.device)
        return int(args.func(args) or 0)
    except user_error_types() as err:
        print(f"worldloop {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"worldloop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
