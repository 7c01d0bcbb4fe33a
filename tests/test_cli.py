"""What every ``worldloop`` command shares: the device option and its resolver, the model option,
``--version``, a help that does not load torch, ``--log-level``, and help texts (every option has one, no
doubled or ``None`` defaults)."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worldloop.app.cli import COMMANDS, HelpFormatter, build_parser, command_parsers, configure_logging, main
from worldloop.models.device import resolve_device

REPO = Path(__file__).resolve().parent.parent


def commands() -> Iterator[tuple[list[str], argparse.ArgumentParser]]:
    """(the words that name it, its parser) for every command that runs something."""
    Found = Iterator[tuple[list[str], argparse.ArgumentParser]]

    def walk(words: list[str], parser: argparse.ArgumentParser) -> Found:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if sub.get_default("func") is not None:
                        yield [*words, name], sub
                    yield from walk([*words, name], sub)

    yield from walk([], build_parser())


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def required_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for a parser's required arguments (never used: the device check comes first)."""
    def value(action: argparse.Action) -> str:
        return str(next(iter(action.choices))) if action.choices else "1"

    argv: list[str] = []
    grouped = set()
    for group in parser._mutually_exclusive_groups:
        grouped |= {id(a) for a in group._group_actions}
        if group.required:
            first = group._group_actions[0]
            argv += [*first.option_strings[:1], value(first)]
    for action in options(parser):
        positional = not action.option_strings and action.nargs is None
        if id(action) not in grouped and (action.required or positional):
            argv += [*action.option_strings[:1], value(action)]
    return argv


def test_every_command_takes_device_auto_by_default() -> None:
    with_device = [words for words, parser in commands()
                   if any("--device" in a.option_strings and a.default == "auto" for a in options(parser))]
    expected = {("play",), ("serve",), ("gradio",), ("rollout",), ("bench",), ("eval",),
                ("world", "record"), *(("train", s) for s in ("vae", "teacher", "idm", "classifier")),
                ("distill", "cd"), ("distill", "dmd"), ("distill", "truth"), ("speedrun",), ("gpu-check",)}
    assert {tuple(w) for w in with_device} == expected


def test_auto_is_cuda_when_available_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("words", [w for w, p in commands() if "--device" in p._option_string_actions],
                         ids=lambda w: " ".join(w))
def test_device_cuda_without_a_gpu_is_one_line_before_anything_runs(
        words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = dict((tuple(w), p) for w, p in commands())[tuple(words)]
    argv = [*words, *required_argv(parser), "--device", "cuda"]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err == f"worldloop {words[0]}: error: --device cuda: no CUDA GPU is available here"


def test_unknown_device_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "record", "--out", "x", "--device", "tpu"]) == 2
    assert capsys.readouterr().err.strip() == ("worldloop world: error: unknown device 'tpu'; use auto, cpu, "
                                               "cuda or cuda:N")


def test_models_are_named_with_model_dir_everywhere() -> None:
    """Every command that loads a world model takes ``--model DIR``; eval and export also their positional."""
    named = {tuple(w) for w, p in commands() if "--model" in p._option_string_actions}
    assert named == {("play",), ("serve",), ("gradio",), ("rollout",), ("bench",), ("eval",), ("export",),
                     ("looks",)}
    metavars = {a.metavar for _, p in commands() for a in options(p)}  # one spelling of a model directory
    assert "DIR" in metavars and not metavars & {"MODEL", "MODEL_DIR"}
    parser = build_parser(["export", "eval"])
    assert parser.parse_args(["export", "--model", "a", "--out", "b"]).model == Path("a")
    assert parser.parse_args(["export", "a", "--out", "b"]).model_positional == Path("a")
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--out", "b"])  # no model at all


def test_eval_takes_models_as_options_and_positionals(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from worldloop.distill.eval import evaluate

    a, b, c = (tmp_path / n for n in "abc")
    for folder in (a, b, c):
        folder.mkdir()
    plans = []
    monkeypatch.setattr(evaluate, "run_eval", lambda plan, *args, **kw: plans.append(plan) or {"runs": []})
    argv = ["eval", "--model", f"{a}@16", f"{b}@2,1", "--model", str(c), "--steps", "4", "--device", "cpu",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert plans == [[(a, 16), (c, 4), (b, 2), (b, 1)]]


def test_steps_mean_denoising_steps() -> None:
    """An option named ``…steps`` counts denoising steps, never iterations or updates."""
    for words, parser in commands():
        for action in options(parser):
            if any(o.endswith("steps") for o in action.option_strings):
                assert "denoising steps" in (action.help or ""), (words, action.option_strings)


def test_version_and_help_do_not_load_torch() -> None:
    code = ("import sys; from worldloop.app.cli import main\n"
            "for argv in (['--version'], ['--help'], []):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'worldloop.app.commands.play' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "worldloop 0." in done.stdout and "play the world model in your browser" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False False"


def test_the_listed_help_lines_are_the_commands_own() -> None:
    parser = build_parser()
    listed = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}
    assert listed == {name: line for name, (_, line) in COMMANDS.items()}


def test_log_level_quiets_other_libraries_but_not_debug() -> None:
    assert all("--log-level" in p._option_string_actions for _, p in commands())
    root, ours = logging.getLogger(), logging.getLogger("worldloop")
    server = logging.getLogger("websockets.server")
    before = root.level, ours.level
    try:
        configure_logging("info")  # the default: websockets' line per HTTP request is not shown
        assert logging.getLogger("worldloop.streaming.server").isEnabledFor(logging.INFO)
        assert not server.isEnabledFor(logging.INFO) and server.isEnabledFor(logging.WARNING)
        configure_logging("error")
        assert not logging.getLogger("worldloop.streaming.engine").isEnabledFor(logging.WARNING)
        configure_logging("debug")
        assert server.isEnabledFor(logging.DEBUG) and ours.isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(before[0])
        ours.setLevel(before[1])


def test_every_option_has_a_help_text_with_one_default_at_most() -> None:
    problems = []
    for words, parser in [([], build_parser()), *commands()]:
        formatter = HelpFormatter(prog="worldloop")
        for action in options(parser):
            if isinstance(action, argparse._VersionAction):
                continue
            name = " ".join([*words, *action.option_strings[:1]] or [action.dest])
            text = formatter._expand_help(action) if action.help else ""
            if not text.strip():
                problems.append(f"{name}: no help")
            elif text.count("(default") > 1 or "None" in text:
                problems.append(f"{name}: {text}")
    assert not problems, "\n".join(problems)
    assert all(p.formatter_class is HelpFormatter for p in command_parsers(build_parser()))
