"""The server end to end on loopback, with a real websocket client and the fake model (tests/fakes.py)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin, Subprotocol

from tests.fakes import FakeWorldModel, RawClient, serve_fake
from tests.train_fakes import random_model_dir
from worldloop.app import loading
from worldloop.app.cli import build_parser, main
from worldloop.app.commands import serve
from worldloop.models.config import preset
from worldloop.streaming.encoding import decode_image
from worldloop.streaming.metrics import Metrics
from worldloop.streaming.outbox import Outbox, OutgoingFrame, Stalled
from worldloop.streaming.protocol import check_access_token
from worldloop.streaming.server import ServerConfig, WorldloopServer

pytestmark = pytest.mark.timeout(60)


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coroutine)


def common(a: dict[int, bytes], b: dict[int, bytes]) -> list[int]:
    both = sorted(set(a) & set(b))
    assert len(both) >= max(2, min(len(a), len(b)) // 2), "too few frames to compare"
    return both


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    def get() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()
    return await asyncio.to_thread(get)


def test_start_then_frames_with_valid_headers() -> None:
    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            ready = await client.start(seed=3, fps=30, quality=90)
            assert (ready["width"], ready["height"], ready["protocol"]) == (32, 32, 1)
            assert ready["model"] == "fake" and ready["resumed"] is False and len(ready["session"]) >= 16
            frames = await client.frames_from(0, 5)
            assert len(frames) >= 4
            for frame in client.frames:
                h = frame.header
                assert (h.width, h.height, h.key_seq) == (32, 32, 0)
                assert abs(h.server_time_ms - time.time() * 1000) < 30_000
                assert decode_image(frame.image).shape == (32, 32, 3)
            seqs = [f.header.frame_seq for f in client.frames]
            assert seqs == sorted(set(seqs))
    run(scenario())


def test_keys_change_frames_and_headers_report_the_key_seq() -> None:
    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            await client.start(seed=1)
            await client.send({"type": "snapshot"})
            snap = await client.reply()
            still = await client.frames_from(snap["frame"], 6)
            await client.send({"type": "keys", "keys": ["w", "turn_left"], "seq": 7})
            await client.send({"type": "restore", "id": snap["id"]})
            done = await client.reply()
            assert done == {"type": "ok", "request": "restore", "frame": done["frame"]}
            moving = await client.frames_from(done["frame"], 6)
            assert all(still[i] != moving[i] for i in common(still, moving))
            assert all(f.header.key_seq == 7 for f in client.frames if f.header.frame_seq >= done["frame"])
    run(scenario())


def test_snapshot_restore_reproduces_frames_and_prompt_switch_changes_them() -> None:
    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            await client.start(seed=5)
            await client.send({"type": "snapshot"})
            snap = await client.reply()
            assert snap["type"] == "snapshot"
            first = await client.frames_from(snap["frame"], 6)
            await client.send({"type": "restore", "id": snap["id"]})
            again = await client.frames_from((await client.reply())["frame"], 6)
            assert all(first[i] == again[i] for i in common(first, again))
            await client.send({"type": "restore", "id": snap["id"]})
            await client.reply()
            await client.send({"type": "prompt", "prompt": "a frozen ice cave"})
            switched = await client.reply()
            assert switched["request"] == "prompt"
            other = await client.frames_from(switched["frame"], 6)
            assert all(first[i] != other[i] for i in common(first, other))
            await client.send({"type": "restore", "id": 99})
            assert (await client.reply())["code"] == "unknown_snapshot"
    run(scenario())


def test_reset_starts_the_stream_again() -> None:
    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            await client.start(seed=9)
            opening = await client.frames_from(0, 5)
            await client.frames_from(5, 3)
            await client.send({"type": "reset"})
            done = await client.reply()
            assert done["request"] == "reset" and done["frame"] >= 8
            replay = await client.frames_from(done["frame"], 5)
            assert all(opening[i] == replay[i] for i in common(opening, replay))
            await client.send({"type": "reset", "seed": 10})
            fresh = await client.frames_from((await client.reply())["frame"], 5)
            assert all(opening[i] != fresh[i] for i in common(opening, fresh))
    run(scenario())


BAD_MESSAGES: list[tuple[str | bytes, str]] = [
    ("{not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"type": "keys", "keys": NaN, "seq": 1}', "bad_json"),
    ('{"type": "keys", "keys": 1, "seq": 1e400}', "bad_json"),
    ('{"type": "restore", "id": 123456789012345678901234567890}', "bad_json"),
    ('{"type": "restore", "id": 4294967296}', "bad_field"),
    ('{"type": "ack", "frame": -1}', "bad_field"),
    ('{"type": "keys", "keys": 1, "seq": true}', "bad_field"),
    ('{"type": "keys", "keys": 1, "seq": 1, "seq": 2}', "bad_json"),
    ("[" * 3000 + "]" * 3000, "too_large"),
    ("[" * 2000 + "]" * 2000, "bad_json"),
    ('{"type": "teleport"}', "unknown_type"),
    ('{"prompt": "x"}', "unknown_type"),
    ('{"type": "keys", "keys": ["jump"], "seq": 1}', "bad_keys"),
    ('{"type": "keys", "keys": 64, "seq": 1}', "bad_keys"),
    ('{"type": "prompt", "prompt": "\\ud800 cave"}', "bad_prompt"),
    ('{"type": "prompt", "prompt": "a cave\\u0007"}', "bad_prompt"),
    (json.dumps({"type": "prompt", "prompt": "cave " * 100}), "bad_prompt"),
    (json.dumps({"type": "prompt", "prompt": "x" * 5000}), "too_large"),
    ('{"type": "prompt", "prompt": "cave", "colour": "red"}', "bad_field"),
    ('{"type": "record", "action": "pause"}', "bad_field"),
    ('{"type": "start", "prompt": "again"}', "already_started"),
    ('{"type": "record", "action": "start"}', "unsupported"),
    (b"\x00\xff junk", "binary_not_allowed"),
    (b"\x00" * 10_000, "binary_not_allowed"),
]


def test_invalid_messages_get_documented_errors_and_the_session_lives_on() -> None:
    documented = Path(__file__).resolve().parent.parent.joinpath("docs", "protocol.md").read_text()

    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            for payload, code in [({"type": "stats"}, "no_session"),
                                  ({"type": "start", "prompt": "x", "steps": 3}, "unsupported"),
                                  ({"type": "start", "prompt": "x", "protocol": 2}, "unsupported_protocol")]:
                await client.send(payload)
                assert (await client.reply())["code"] == code
            await client.start()
            for payload, code in BAD_MESSAGES:
                await client.send(payload)
                error = await client.reply()
                assert error["type"] == "error" and error["code"] == code, (payload[:60], error)
                assert f"`{code}`" in documented
                await client.send({"type": "stats"})
                assert (await client.reply())["type"] == "stats"
            await client.frames_from(client.frames[-1].header.frame_seq + 1 if client.frames else 0, 3)
            assert server.metrics.protocol_errors.value("bad_json") >= 5
    run(scenario())


def test_command_spam_is_rate_limited_and_the_session_lives_on() -> None:
    async def scenario() -> None:
        limited = serve_fake(command_rate=1.0, command_burst=3)
        async with limited as server, RawClient.connect(server) as client:
            await client.start()
            codes = []
            for i in range(6):
                await client.send({"type": "prompt", "prompt": f"cave number {i}"})
                reply = await client.reply()
                codes.append(reply.get("code", reply["type"]))
            assert codes[:3] == ["ok"] * 3 and set(codes[3:]) == {"rate_limited"}, codes
            assert server.metrics.protocol_errors.value("rate_limited") >= 3
            await client.send({"type": "keys", "keys": ["forward"], "seq": 1})  # keys are never limited
            await client.send({"type": "stats"})
            assert (await client.reply())["type"] == "stats"
            await asyncio.sleep(1.1)
            await client.send({"type": "prompt", "prompt": "a frozen ice cave"})
            assert (await client.reply())["type"] == "ok"
            await client.frames_from(client.frames[-1].header.frame_seq + 1, 2)
    run(scenario())


def test_messages_over_the_transport_limit_close_the_socket() -> None:
    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            await client.start()
            await client.send("x" * 200_000)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await client.receive()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    run(scenario())


def test_a_client_that_never_reads_does_not_slow_others_and_is_dropped() -> None:
    async def scenario() -> None:
        model = FakeWorldModel(step_delay=0.004)
        async with serve_fake(model, ack_timeout_s=1.5, resume_grace_s=0) as server:
            async with RawClient.connect(server) as reader:
                await reader.start(fps=20)
                await reader.count_frames(0.3)
                alone = await reader.count_frames(1.5)
                # This client reads nothing and acknowledges nothing.
                async with connect(f"ws://127.0.0.1:{server.port}/ws") as stalled:
                    await stalled.send(json.dumps({"type": "start", "prompt": "a cave", "fps": 20}))
                    shared = await reader.count_frames(1.5)
                    deadline = time.monotonic() + 10
                    while server.metrics.dropped_clients.value("ack_deadline") < 1:
                        assert time.monotonic() < deadline, "the stalled client was never dropped"
                        await reader.count_frames(0.2)
                    await asyncio.wait_for(stalled.wait_closed(), 5)
                    assert server.engine.session_count == 1  # its session ended (no grace here)
                assert alone >= 15, alone
                assert shared >= 0.7 * alone, (alone, shared)
                await reader.frames_from(reader.frames[-1].header.frame_seq + 1, 3)
    run(scenario())


def test_outbox_flow_control_and_deadlines() -> None:
    async def scenario() -> None:
        sent: list[str | bytes] = []
        release = asyncio.Event()

        async def send(data: str | bytes) -> None:
            sent.append(data)
            await release.wait()  # the client's socket is full until released

        outbox = Outbox(send, Metrics(), max_in_flight=2, send_timeout=0.3, ack_timeout=0.5)
        paused: list[bool] = []
        outbox.on_backpressure = paused.append
        runner = asyncio.create_task(outbox.run())
        outbox.post("hello")
        outbox.offer(OutgoingFrame(0, b"f0", 0.0))
        outbox.offer(OutgoingFrame(1, b"f1", 0.0))  # replaces frame 0: latest frame wins
        with pytest.raises(Stalled, match="send_deadline"):
            await asyncio.wait_for(runner, 5)
        assert sent == ["hello"] and outbox.dropped == 1

        release.set()
        outbox = Outbox(send, Metrics(), max_in_flight=2, send_timeout=0.3, ack_timeout=0.5)
        outbox.on_backpressure = paused.append
        runner = asyncio.create_task(outbox.run())
        for seq in range(3):
            outbox.offer(OutgoingFrame(seq, b"f%d" % seq, 0.0))
            await asyncio.sleep(0.01)
        assert outbox.in_flight == 2 and paused == [True]  # frame 2 waits; generation pauses
        outbox.ack(1)
        await asyncio.sleep(0.01)
        assert outbox.in_flight == 1 and paused == [True, False] and sent[-1] == b"f2"
        with pytest.raises(Stalled, match="ack_deadline"):
            await asyncio.wait_for(runner, 5)  # frame 2 is never acknowledged

        outbox = Outbox(send, Metrics(), max_control=4)
        for _ in range(5):
            outbox.post("reply")
        with pytest.raises(Stalled, match="control_overflow"):
            await asyncio.wait_for(outbox.run(), 5)
    run(scenario())


def test_abrupt_disconnect_frees_the_session_after_the_grace_period() -> None:
    async def scenario() -> None:
        async with serve_fake(resume_grace_s=0.3) as server:
            async with RawClient.connect(server) as client:
                await client.start()
                await client.frames_from(0, 2)
                assert server.engine.session_count == 1
                client.ws.transport.abort()
            deadline = time.monotonic() + 10
            while server.engine.session_count:
                assert time.monotonic() < deadline, "the session was never freed"
                await asyncio.sleep(0.05)
            assert server.engine.model.sessions_created == 1
            async with RawClient.connect(server) as client:
                await client.start()  # the slot is free again
    run(scenario())


def test_resume_reattaches_the_session_within_the_grace_period() -> None:
    async def scenario() -> None:
        async with serve_fake(resume_grace_s=20) as server:
            async with RawClient.connect(server) as client:
                ready = await client.start(seed=4)
                await client.send({"type": "prompt", "prompt": "neon city"})
                await client.reply()
                await client.frames_from(0, 3)
                last = client.frames[-1].header.frame_seq
                client.ws.transport.abort()
            async with RawClient.connect(server) as client:
                await client.send({"type": "start", "prompt": "ignored", "session": "x" * 24})
                assert (await client.reply())["code"] == "unknown_session"
                again = await client.start(session=ready["session"])
                assert again["resumed"] is True and again["session"] == ready["session"]
                assert again["prompt"] == "neon city" and again["seed"] == 4
                await client.frames_from(last + 1, 2)
                assert client.frames[0].header.frame_seq > last
                assert server.engine.session_count == 1 and server.engine.model.sessions_created == 1
            await asyncio.sleep(0.2)
            assert server.engine.session_count == 0  # a clean close ends it at once
    run(scenario())


def test_the_session_limit_refuses_cleanly_before_any_model_state() -> None:
    async def scenario() -> None:
        async with serve_fake(max_sessions=1) as server, RawClient.connect(server) as first:
            await first.start()
            async with RawClient.connect(server) as second:
                await second.send({"type": "start", "prompt": "a cave"})
                error = await second.reply()
                assert error["code"] == "server_full"
                with pytest.raises(ConnectionClosed) as closed:
                    await second.receive()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert server.engine.model.sessions_created == 1
            assert server.metrics.refused.value("full") == 1
            await first.frames_from(0, 2)
    run(scenario())


def test_origin_and_token_are_checked() -> None:
    async def scenario() -> None:
        async with serve_fake(token="sesame-1234") as server:
            url = f"ws://127.0.0.1:{server.port}/ws"
            good = {"Authorization": "Bearer sesame-1234"}
            for headers, origin, status in [(None, None, 401), ({"Authorization": "Bearer nope"}, None, 401),
                                            (good, "http://evil.example", 403)]:
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(url, additional_headers=headers, origin=origin):  # type: ignore[arg-type]
                        pass
                assert refused.value.response.status_code == status
            for origin in (None, "http://localhost:5173", f"http://127.0.0.1:{server.port}"):
                async with connect(url, additional_headers=good, origin=origin):  # type: ignore[arg-type]
                    pass
            assert server.metrics.refused.value("token") == 2 and server.metrics.refused.value("origin") == 1
            status, _, _ = await http_get(f"http://127.0.0.1:{server.port}/metrics")
            assert status == 401
            status, _, body = await http_get(f"http://127.0.0.1:{server.port}/metrics", good)
            assert status == 200 and b"worldloop_refused_total" in body
    run(scenario())


def test_browsers_offer_the_token_as_a_subprotocol_and_get_worldloop_v1_back() -> None:
    v1, right = Subprotocol("worldloop.v1"), Subprotocol("worldloop.token.sesame-1234")

    async def scenario() -> None:
        async with serve_fake(token="sesame-1234") as server:
            browser = {"origin": Origin(f"http://127.0.0.1:{server.port}")}
            async with RawClient.connect(server, subprotocols=[v1, right], **browser) as client:
                assert client.ws.subprotocol == "worldloop.v1"
                assert "sesame" not in str(client.ws.response.headers)
                await client.start()
                assert len(await client.frames_from(0, 3)) >= 2
            refused = [[v1], [v1, Subprotocol("worldloop.token.sesame-9999")],
                       [v1, Subprotocol("worldloop.token.")],
                       [v1, Subprotocol("worldloop.token.nope-1234"), right]]  # one guess per request
            for offered in refused:
                with pytest.raises(InvalidStatus) as answer:
                    async with RawClient.connect(server, subprotocols=offered, **browser):
                        pass
                assert answer.value.response.status_code == 401
            assert server.metrics.refused.value("token") == len(refused)
            async with RawClient.connect(server, additional_headers={"Authorization": "Bearer sesame-1234"},
                                         subprotocols=[v1]) as client:  # the header still works
                assert client.ws.subprotocol == "worldloop.v1"
                assert (await client.start())["type"] == "ready"
            async with RawClient.connect(server, additional_headers={"Authorization": "Bearer sesame-1234"}) \
                    as client:  # programs need not offer a subprotocol
                assert client.ws.subprotocol is None
                await client.start()
            offer = {"Sec-WebSocket-Protocol": f"{v1}, {right}"}
            status, _, _ = await http_get(f"http://127.0.0.1:{server.port}/metrics", offer)
            assert status == 401  # the subprotocol counts on the websocket only
    run(scenario())


def test_tokens_must_be_subprotocol_safe() -> None:
    for token in ("short", "has space in it", "comma,separated", "ünïcode-token", "x" * 257):
        with pytest.raises(ValueError, match="websocket subprotocol"):
            check_access_token(token)
        with pytest.raises(ValueError, match="websocket subprotocol"):
            WorldloopServer(None, ServerConfig(token=token))  # type: ignore[arg-type]
    assert check_access_token("Az09!#$%&'*+-.^_`|~") == "Az09!#$%&'*+-.^_`|~"


def test_serve_refuses_a_token_that_cannot_be_a_subprotocol(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["serve", "--preset", "tiny", "--token", "open sesame"]) == 2
    assert "--token (or WORLDLOOP_TOKEN): an access token must be" in capsys.readouterr().err
    monkeypatch.setenv("WORLDLOOP_TOKEN", "café-au-lait")
    assert main(["serve", "--preset", "tiny"]) == 2
    assert "websocket subprotocol" in capsys.readouterr().err


def test_ready_says_whether_the_weights_are_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the model's choice (app/loading.py) through `worldloop serve` to `ready.trained` and /healthz."""
    model_dir = random_model_dir(preset("tiny"), tmp_path / "model")

    async def scenario(argv: list[str], trained: bool) -> None:
        _, engine, config = serve.build(build_parser().parse_args(["serve", "--port", "0", *argv]))
        engine.start()
        try:
            async with WorldloopServer(engine, config) as server, RawClient.connect(server) as client:
                ready = await client.start()
                assert ready["trained"] is trained and ready["model"] == "tiny"
                _, _, body = await http_get(f"http://127.0.0.1:{server.port}/healthz")
                assert json.loads(body)["trained"] is trained
        finally:
            await asyncio.to_thread(engine.close)

    run(scenario(["--preset", "tiny"], False))
    run(scenario(["--model", str(model_dir)], True))
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "not-shipped")
    assert loading.choose_model(None, None, fallback=True).trained is False  # the out-of-the-box fallback


def test_healthz_metrics_and_static_files(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>the web client</h1>")
    (tmp_path / "app.js").write_text("export {};")

    async def scenario() -> None:
        async with serve_fake(web_dir=tmp_path) as server, RawClient.connect(server) as client:
            base = f"http://127.0.0.1:{server.port}"
            await client.start()
            await client.frames_from(0, 3)
            status, headers, body = await http_get(f"{base}/healthz")
            health = json.loads(body)
            assert status == 200 and health["status"] == "ok" and health["sessions"] == 1
            assert headers["Content-Type"] == "application/json"
            status, headers, body = await http_get(f"{base}/metrics")
            text = body.decode()
            assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
            for name in ("worldloop_sessions 1", "worldloop_fps", "worldloop_frame_latency_seconds_bucket",
                         "worldloop_frames_generated_total", "worldloop_frames_sent_total",
                         "worldloop_frames_dropped_total", "worldloop_speculative_frames_total"):
                assert name in text, name
            assert (await http_get(f"{base}/"))[2] == b"<h1>the web client</h1>"
            status, headers, _ = await http_get(f"{base}/app.js")
            assert status == 200 and "javascript" in headers["Content-Type"]
            for path in ("/../fakes.py", "/%2e%2e/fakes.py", "/.hidden", "/nothing.html"):
                assert (await http_get(base + path))[0] == 404, path
            status, _, _ = await http_get(f"{base}/healthz", {"Host": "rebound.example:80"})
            assert status == 403
    run(scenario())


def test_fallback_page_when_the_web_client_is_missing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serve_fake(web_dir=tmp_path / "missing") as server:
            status, _, body = await http_get(f"http://127.0.0.1:{server.port}/")
            assert status == 200 and b"browser client is not installed" in body
    run(scenario())


def test_shutdown_says_bye() -> None:
    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            await client.start()
            await client.frames_from(0, 2)
            closing = asyncio.create_task(server.close())
            bye = await client.reply()
            assert bye == {"type": "bye", "reason": "shutdown"}
            await closing
            assert server.engine.session_count == 0
    run(scenario())
