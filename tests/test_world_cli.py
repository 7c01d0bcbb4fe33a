"""``worldloop world``: recording episodes, key scripts, and one-line errors that leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldloop.app.cli import main
from worldloop.app.commands.world import parse_key_script
from worldloop.distill.data.episodes import read_episode
from worldloop.models.keys import parse_keys

pytestmark = pytest.mark.usefixtures("single_thread")


def test_record_with_the_explorer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eps" / "ice"
    assert main(["world", "record", "--out", str(out), "--frames", "8", "--size", "64x96", "--theme",
                 "ice cave", "--seed", "2", "--fps", "15"]) == 0
    ep = read_episode(out)
    assert (ep.n_frames, ep.width, ep.height, ep.fps) == (8, 64, 96, 15)
    assert ep.meta.params["theme"] == "ice cave" and "ice cave" in ep.prompt_at(0)
    assert ep.poses.shape == (8, 3) and ep.meta.extra["policy"] == "explorer"
    assert sum(1 for _ in ep.iter_frames()) == 8
    assert "recorded 8 frames" in capsys.readouterr().out


def test_record_with_a_key_script(tmp_path: Path) -> None:
    script = tmp_path / "walk.txt"
    script.write_text("# walk, then look around\n3*w\nw+a\n\nq  # turn\nnone\n2 * turn_right\n")
    out = tmp_path / "ep"
    assert main(["world", "record", "--out", str(out), "--keys", str(script), "--size", "64",
                 "--lossless"]) == 0
    ep = read_episode(out)
    expected = [parse_keys(k) for k in ("w", "w", "w", "w+a", "q", "none", "e", "e")]
    assert ep.keys.tolist() == expected and ep.lossless
    assert ep.load_frames().shape == (8, 64, 64, 3)
    assert main(["world", "record", "--out", str(tmp_path / "ep3"), "--keys", str(script), "--frames", "3",
                 "--size", "64"]) == 0
    assert read_episode(tmp_path / "ep3").keys.tolist() == expected[:3]


def test_key_script_format() -> None:
    assert parse_key_script("30*w\nw+a\n-\nforward+turn_left\n") == [
        (30, parse_keys("w")), (1, parse_keys("w+a")), (1, 0), (1, parse_keys("w+q"))]
    with pytest.raises(ValueError, match="walk.txt:2: .*'w\\+z'"):
        parse_key_script("w\nw+z\n", "walk.txt")


@pytest.mark.parametrize("args, message", [
    (["--theme", "moon base"], "unknown theme 'moon base'"),
    (["--size", "63"], "even number from 64 to 256"),
    (["--size", "0"], "even number from 64 to 256"),
    (["--size", "-64"], "even number from 64 to 256"),
    (["--size", "300"], "even number from 64 to 256"),
    (["--size", "64x65"], "even number from 64 to 256"),
    (["--size", "big"], "--size must be N or WIDTHxHEIGHT"),
    (["--frames", "0"], "--frames must be positive"),
    (["--fps", "0"], "--fps must be"),
    (["--keys", "SCRIPT_BAD"], "script.txt:3: unknown key 'x'"),
    (["--keys", "SCRIPT_OK", "--frames", "50"], "has 4 frames, --frames asks for 50"),
    (["--keys", "MISSING"], "cannot read key script"),
    (["--out", "UNWRITABLE"], "cannot write into"),
    (["--device", "blah"], "unknown device 'blah'"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         args: list[str], message: str) -> None:
    (tmp_path / "script.txt").write_text("w\n2*q\nw+x\n")
    (tmp_path / "ok.txt").write_text("4*w\n")
    (tmp_path / "a-file").write_text("not a folder")
    names = {"SCRIPT_BAD": "script.txt", "SCRIPT_OK": "ok.txt", "MISSING": "nope.txt",
             "UNWRITABLE": "a-file/ep"}
    args = [str(tmp_path / names[a]) if a in names else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    base = ["world", "record", "--frames", "4", "--size", "64"]
    if "--out" not in args:
        base += ["--out", str(tmp_path / "ep")]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no episode, no temporary folder


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ep"
    cmd = ["world", "record", "--out", str(out), "--frames", "2", "--size", "64"]
    assert main(cmd) == 0
    assert main(cmd) == 2 and "already exists" in capsys.readouterr().err
    assert main(cmd + ["--frames", "3", "--force"]) == 0
    assert read_episode(out).n_frames == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["ep"]


def test_themes_lists_every_theme(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "themes"]) == 0
    out = capsys.readouterr().out
    for theme in ("dungeon", "ice cave", "desert ruins", "toxic lab", "neon city", "hell fortress"):
        assert f"{theme} of" in out


def test_only_user_errors_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A UserError is one line and exit 2; any other error (a bug) keeps its traceback."""
    from worldloop.app.commands import world
    from worldloop.app.errors import UserError

    def user_error(args: object) -> int:
        raise UserError("bad option")

    def bug(args: object) -> int:
        raise ValueError("a bug")

    monkeypatch.setattr(world, "list_themes", user_error)
    assert main(["world", "themes"]) == 2 and "error: bad option" in capsys.readouterr().err
    monkeypatch.setattr(world, "list_themes", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["world", "themes"])
