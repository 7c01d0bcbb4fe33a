"""Where sessions start: frames of a fresh built-in world (the default), a user's picture, or the prompt
alone — in the engine, over the websocket protocol (`start_from`, `first_frame`), in `WorldModel.reset`,
and in ``worldloop rollout --start/--first-frame``."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.fakes import FakeWorldModel, RawClient, ReceivedFrame, serve_fake
from worldloop.app.cli import main
from worldloop.app.starts import WorldStart, context_frames, prompt_theme
from worldloop.distill.data.clips import downsample, open_headings, random_poses
from worldloop.distill.world.engine import World
from worldloop.distill.world.themes import sample_params
from worldloop.models.config import preset
from worldloop.models.images import MAX_PICTURE_BYTES, read_picture
from worldloop.models.world_model import WorldModel
from worldloop.streaming.engine import Engine
from worldloop.streaming.protocol import MAX_PICTURE_MESSAGE_BYTES, ProtocolError, parse_client_message
from worldloop.streaming.session import SessionOptions, StartFrames, Starts

pytestmark = pytest.mark.timeout(300)  # world renders crawl on a loaded 2-core machine
PROMPT = "a dark stone dungeon"
WAIT = 120  # seconds: world renders crawl on a loaded 2-core machine


@functools.cache
def world32(prompt: str, seed: int) -> StartFrames:
    """The real world start at the fake model's 32 px, each (prompt, seed) rendered once per test run."""
    return WorldStart(32, 32, 3)(prompt, seed)


def fake_world(prompt: str, seed: int) -> StartFrames:
    """A cheap stand-in for tests of the plumbing: frames that are a function of (prompt, seed)."""
    rng = np.random.default_rng([seed, len(prompt)])
    return StartFrames(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), (0, 1, 1))


def png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def halves(height: int, width: int) -> np.ndarray:
    """A picture whose left half is red, right half blue, with a green centre column band."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = (200, 0, 0)
    rgb[:, width // 2:] = (0, 0, 200)
    rgb[:, width // 2 - width // 16: width // 2 + width // 16] = (0, 200, 0)
    return rgb


# ---- the world start and pictures --------------------------------------------------------------------------

def test_world_start_is_a_fresh_world_of_the_prompts_theme_seeded_by_the_session_seed() -> None:
    world = WorldStart(32, 32, 3)
    cave = "a frozen ice cave"
    a, again, other = world(cave, 5), world(cave, 5), world(cave, 6)
    assert a.frames.shape == (3, 32, 32, 3) and a.frames.dtype == np.uint8 and len(a.keys) == 3
    assert a.keys[0] == 0  # the first frame is made with no keys, as in training clips
    np.testing.assert_array_equal(a.frames, again.frames)
    assert a.keys == again.keys
    assert not np.array_equal(a.frames[0], other.frames[0])
    # The frames are the engine's: the ice-cave world of seed 5, rendered at 64 px (the engine's smallest)
    # from the start pose and downsampled to the model's 32 px, then moved by the keys the start reports.
    truth = World([sample_params(5, "ice cave")], 64, 64)
    g = torch.Generator().manual_seed(5)
    truth.set_poses(random_poses(truth.grid.cpu(), g))
    truth.set_poses(open_headings(truth, g))
    frames = [truth.render()] + [truth.next_frame(torch.tensor([k])) for k in a.keys[1:]]
    np.testing.assert_array_equal(downsample(torch.cat(frames), 2).numpy(), a.frames)
    assert prompt_theme("A frozen ICE CAVE by a neon city") == "ice cave" and prompt_theme("a castle") is None


def test_context_frames_are_the_sink_and_two_more() -> None:
    config = preset("default")
    assert context_frames(config) == config.dit.sink + 2
    tiny = preset("tiny")
    assert context_frames(tiny) == min(tiny.dit.sink + 2, tiny.dit.sink + tiny.dit.window)


def test_pictures_are_centre_cropped_and_resized_to_the_frame_size() -> None:
    wide = halves(60, 240)  # 4:1 → the centre 60×60 square: red, the 30 px green band, blue
    out = read_picture(png(wide), 32, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[16, 16].tolist() == out[16, 10].tolist() == [0, 200, 0]  # cropped, not squashed

    assert out[16, 0, 0] > 150 and out[16, 31, 2] > 150  # the crop's edges: red left, blue right
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(halves(16, 16), cv2.COLOR_RGB2BGR))[1].tobytes()
    assert read_picture(jpeg, 64, 64).shape == (64, 64, 3)  # enlarged
    webp = cv2.imencode(".webp", cv2.cvtColor(halves(40, 40), cv2.COLOR_RGB2BGR))[1].tobytes()
    assert read_picture(webp, 32, 32).shape == (32, 32, 3)


@pytest.mark.parametrize(("data", "message"), [
    (b"GIF89a" + bytes(40), "must be a PNG, JPEG or WebP"),
    (b"\x89PNG\r\n\x1a\n" + bytes(8) + (20000).to_bytes(4, "big") * 2 + bytes(20), "at most 4096 a side"),
    (b"\x89PNG\r\n\x1a\n" + bytes(8) + (64).to_bytes(4, "big") * 2 + b"garbage" * 10, "could not be decoded"),
    (b"\xff\xd8\xff" + bytes(MAX_PICTURE_BYTES), "at most 65536 bytes"),
])
def test_bad_pictures_are_refused_with_one_line_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        read_picture(data, 32, 32)
    assert "\n" not in str(err.value)


# ---- the engine --------------------------------------------------------------------------------------------

def test_an_engine_session_starts_from_the_worlds_frames_for_its_seed() -> None:
    model = FakeWorldModel()
    with Engine(model, starts=Starts(world32)) as engine:
        handle = engine.open_session(SessionOptions(PROMPT, seed=7))
        handle.started.result(WAIT)
        assert handle.start_from == "world"
        session = model.sessions[-1]
        expected = world32(PROMPT, 7)
        np.testing.assert_array_equal(session.context, expected.frames)
        assert session.context_keys == list(expected.keys)
        # A reset with a new seed starts again from a fresh world of that seed; one to the prompt drops it.
        handle.reset(seed=8).result(WAIT)
        np.testing.assert_array_equal(session.context, world32(PROMPT, 8).frames)
        handle.reset(start_from="prompt").result(WAIT)
        assert session.context is None and handle.start_from == "prompt"
        picture = halves(32, 32)
        handle.reset(picture=picture).result(WAIT)
        np.testing.assert_array_equal(session.context, picture[None])
        assert session.context_keys == [0] and handle.start_from == "picture"
        with pytest.raises(ValueError, match="uint8 \\(32, 32, 3\\)"):
            handle.reset(picture=halves(16, 16))
        handle.close().result(WAIT)


def test_without_a_world_sessions_start_from_the_prompt_and_a_world_start_is_refused() -> None:
    model = FakeWorldModel()
    with Engine(model) as engine:
        handle = engine.open_session(SessionOptions(PROMPT))
        handle.started.result(WAIT)
        assert handle.start_from == "prompt" and model.sessions[-1].context is None
        with pytest.raises(ValueError, match="no built-in world"):
            engine.open_session(SessionOptions(PROMPT, start_from="world"))
        assert engine.session_count == 1  # the refused one was never admitted


def test_reset_with_first_frames_equals_a_new_session_from_them(prompt_encoder, single_thread) -> None:
    wm = WorldModel.from_config(preset("tiny"), prompt_encoder=prompt_encoder, max_sessions=2)
    start = WorldStart(*wm.frame_shape, 3)("a toxic lab", 3)
    fresh = wm.new_session("a toxic lab", 3, first_frames=start.frames, first_keys=start.keys)
    reused = wm.new_session("a neon city", 9)
    wm.next_frame([reused], [1])
    wm.reset(reused, prompt="a toxic lab", seed=3, first_frames=start.frames, first_keys=start.keys)
    assert reused.frame_index == fresh.frame_index == 3
    for keys in (1, 1, 16):
        a, b = wm.next_frame([fresh], [keys]), wm.next_frame([reused], [keys])
        np.testing.assert_array_equal(a, b)


# ---- the protocol ------------------------------------------------------------------------------------------

def test_the_parser_takes_a_picture_only_in_start_and_reset() -> None:
    picture = b64(png(halves(32, 32)))
    start = parse_client_message(json.dumps({"type": "start", "prompt": "x", "first_frame": picture}))
    assert start.first_frame == picture  # type: ignore[union-attr]
    url = "data:image/png;base64," + picture
    assert parse_client_message(json.dumps({"type": "reset", "first_frame": url})).first_frame == url  # type: ignore
    with pytest.raises(ProtocolError) as err:
        parse_client_message(json.dumps({"type": "start", "prompt": "x", "first_frame": picture,
                                          "start_from": "world"}))
    assert err.value.code == "bad_field"
    with pytest.raises(ProtocolError) as err:  # a big message must be a picture message
        parse_client_message(json.dumps({"type": "prompt", "prompt": "x", "first_frame": "A" * 5000}))
    assert err.value.code == "too_large"


def test_served_sessions_start_from_the_world_a_picture_or_the_prompt() -> None:
    model = FakeWorldModel()
    for prompt, seed in (("", 0), ("a stone dungeon", 11), ("an ice cave", 12)):
        world32(prompt, seed)  # rendered before the clock of the 10 s replies starts

    async def scenario() -> None:
        async with serve_fake(model, starts=Starts(world32)) as server:
            async with RawClient.connect(server) as client:
                ready = await client.start(seed=11)
                assert ready["start_from"] == "world"
                assert isinstance(await client.receive(WAIT), ReceivedFrame)  # the stream runs
                expected = world32("a stone dungeon", 11).frames
                np.testing.assert_array_equal(model.sessions[-1].context, expected)
                # "New world": a reset with a new seed renders a fresh world of the prompt's theme.
                await client.send({"type": "reset", "seed": 12, "prompt": "an ice cave"})
                assert (await client.reply(WAIT))["type"] == "ok"
                np.testing.assert_array_equal(model.sessions[-1].context, world32("an ice cave", 12).frames)
            async with RawClient.connect(server) as client:
                assert (await client.start(start_from="prompt"))["start_from"] == "prompt"
                assert model.sessions[-1].context is None
            async with RawClient.connect(server) as client:
                wide = halves(40, 80)
                ready = await client.start(first_frame=b64(png(wide)))
                assert ready["start_from"] == "picture"
                np.testing.assert_array_equal(model.sessions[-1].context[0], read_picture(png(wide), 32, 32))
                assert isinstance(await client.receive(WAIT), ReceivedFrame)
    asyncio.run(scenario())


@pytest.mark.parametrize(("first_frame", "code", "says"), [
    ("not base64 at all!", "bad_image", "not valid base64"),
    (b64(b"just some text, no picture"), "bad_image", "PNG, JPEG or WebP"),
    (b64(b"\x89PNG\r\n\x1a\n" + bytes(8) + (64).to_bytes(4, "big") * 2 + b"x" * 100), "bad_image",
     "could not be decoded"),
    (b64(b"\xff\xd8\xff" + bytes(MAX_PICTURE_BYTES)), "bad_image", "at most 65536"),
    (b64(bytes(80_000)), "too_large", str(MAX_PICTURE_MESSAGE_BYTES)),  # over 96 KiB, under the 128 KiB close
])
def test_bad_pictures_get_a_clear_error_and_the_connection_stays_usable(first_frame: str, code: str,
                                                                         says: str) -> None:
    async def scenario() -> None:
        async with serve_fake(starts=Starts(fake_world)) as server:
            async with RawClient.connect(server) as client:
                await client.send({"type": "start", "prompt": "a dungeon", "first_frame": first_frame})
                error = await client.reply()
                # A message too large to parse names no request.
                request = {"request": "start"} if code != "too_large" else {}
                assert error == {"type": "error", "code": code, "message": error["message"], **request}
                assert says in error["message"], error
                ready = await client.start()  # the same connection starts a session after all
                assert ready["start_from"] == "world"
                await client.send({"type": "reset", "first_frame": first_frame})
                error = await client.reply()
                assert error["code"] == code and error.get("request", "reset") == "reset", error
                await client.send({"type": "stats"})
                assert (await client.reply())["type"] == "stats"
    asyncio.run(scenario())


def test_a_server_without_the_world_refuses_a_world_start() -> None:
    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            await client.send({"type": "start", "prompt": "a dungeon", "start_from": "world"})
            error = await client.reply()
            assert error["code"] == "unsupported" and "built-in world" in error["message"]
            assert (await client.start())["start_from"] == "prompt"
    asyncio.run(scenario())


# ---- worldloop rollout -------------------------------------------------------------------------------------

def rollout_cli(tmp_path: Path, name: str, *extra: str) -> int:
    return main(["rollout", "--preset", "tiny", "--prompt", "an ice cave", "--frames", "4", "--quiet",
                 "--out", str(tmp_path / f"{name}.mp4"), *extra])


def sidecar(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.mp4.json").read_text())


@pytest.mark.usefixtures("single_thread")
def test_rollout_starts_from_the_world_a_picture_or_the_prompt(tmp_path: Path, capsys) -> None:
    picture = tmp_path / "start.png"
    picture.write_bytes(png(halves(48, 64)))
    assert rollout_cli(tmp_path, "world") == 0
    assert rollout_cli(tmp_path, "again") == 0
    assert rollout_cli(tmp_path, "picture", "--first-frame", str(picture)) == 0
    assert rollout_cli(tmp_path, "prompt", "--start", "prompt") == 0
    world, again = sidecar(tmp_path, "world"), sidecar(tmp_path, "again")
    assert world["start"] == {"from": "world", "context_frames": context_frames(preset("tiny"))}
    assert world["frames_sha256"] == again["frames_sha256"]  # same seed, same world, same video
    assert sidecar(tmp_path, "picture")["start"] == {"from": "picture", "context_frames": 1,
                                                     "picture": str(picture)}
    assert sidecar(tmp_path, "prompt")["start"] == {"from": "prompt", "context_frames": 0}
    assert sidecar(tmp_path, "prompt")["frames"] == 4


def test_rollout_with_a_bad_first_frame_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a picture")
    assert rollout_cli(tmp_path, "bad", "--first-frame", str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--first-frame" in err and "PNG, JPEG or WebP" in err
    assert not (tmp_path / "bad.mp4").exists()  # refused before the model loads
    assert rollout_cli(tmp_path, "missing", "--first-frame", str(tmp_path / "nope.png")) == 2
    assert "No such file" in capsys.readouterr().err
    assert rollout_cli(tmp_path, "both", "--first-frame", str(bad), "--start", "prompt") == 2
    assert "either --start or --first-frame" in capsys.readouterr().err
