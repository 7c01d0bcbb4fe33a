"""The server under abuse, on loopback with the fake model: floods, idle squatters, stalled readers, guessing.

Each test asserts behaviour (a reply came, the connection is still served, a client was dropped within a
generous deadline), never speed: the machine running them may be loaded. Speed ratios are measured by
``benchmarks/flood.py`` and ``benchmarks/soak.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Opcode

from tests.fakes import FakeWorldModel, RawClient, client_frame, raw_websocket, serve_fake
from worldloop.app.cli import build_parser
from worldloop.app.commands import serve
from worldloop.streaming.limits import FailureBackoff, TokenBucket
from worldloop.streaming.protocol import unpack_frame

pytestmark = pytest.mark.timeout(90)


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coroutine)


def http(url: str, method: str = "GET",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def until(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def still_streaming(client: RawClient) -> None:
    """The connection carries on: `stats` is answered and new frames arrive."""
    await client.send({"type": "stats"})
    assert (await client.reply())["type"] == "stats"
    await client.frames_from(client.frames[-1].header.frame_seq + 1 if client.frames else 0, 3)


def test_requests_arriving_in_one_write_are_all_answered() -> None:
    """65 `stats` in one TCP write used to abort the connection (the reply queue overflowed before its sender
    could run)."""
    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            await client.start()
            client.ws.transport.write(client_frame(Opcode.TEXT, b'{"type": "stats"}') * 150)
            replies = [await client.reply() for _ in range(150)]
            assert {r["type"] for r in replies} == {"stats"}
            await still_streaming(client)
            assert server.metrics.dropped_clients.value("control_overflow") == 0
    run(scenario())


def test_a_prompt_flood_gets_rate_limited_and_the_reader_stays_connected() -> None:
    """100 prompts a second while the model re-caches slowly: the extra ones are answered `rate_limited`
    (consecutive ones in one reply that counts them), acks are still read (a slow command no longer holds up
    the socket), the client is never dropped."""
    async def scenario() -> None:
        model = FakeWorldModel(prompt_delay=0.1)
        async with serve_fake(model, ack_timeout_s=2.0) as server, RawClient.connect(server) as client:
            await client.start()
            replies: list[dict[str, Any]] = []

            async def read() -> None:
                while True:
                    replies.append(await client.reply(30))

            reader = asyncio.create_task(read())
            for i in range(400):  # 4 s at 100 a second
                await client.send({"type": "prompt", "prompt": f"cave {i}"})
                await asyncio.sleep(0.01)
            await client.send({"type": "stats"})
            await until(lambda: replies and replies[-1]["type"] == "stats", 60, "no reply to `stats`")
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            answered = 0
            for reply in replies[:-1]:
                if reply["type"] == "ok":
                    answered += 1
                else:
                    assert (reply["code"], reply["request"]) == ("rate_limited", "prompt"), reply
                    match = re.search(r"(\d+) `prompt` commands in a row were dropped", reply["message"])
                    answered += int(match.group(1)) if match else 1
            assert answered == 400 and {r["type"] for r in replies[:-1]} == {"ok", "error"}
            await still_streaming(client)
            assert sum(server.metrics.dropped_clients.value(r) for r in ("ack_deadline", "send_deadline",
                                                                          "control_overflow", "flood")) == 0
    run(scenario())


def test_every_message_counts_against_the_budget_and_a_flood_is_closed() -> None:
    async def scenario() -> None:
        async with serve_fake(message_rate=50, message_burst=40) as server:
            async with RawClient.connect(server) as client:
                await client.start()
                # Errors count too: 60 bad messages overdraw the budget but not by a second burst.
                client.ws.transport.write(client_frame(Opcode.TEXT, b'{"type": "teleport"}') * 60)
                codes = [(await client.reply())["code"] for _ in range(61)]
                assert codes.count("unknown_type") == 60 and codes.count("rate_limited") == 1, codes
                await still_streaming(client)
                assert server.metrics.throttled.value() >= 1
            dropped = server.metrics.dropped_clients
            for floods in (1, 2):
                async with RawClient.connect(server) as flooder:
                    await flooder.start()
                    flooder.ws.transport.write(client_frame(Opcode.PING, b"x" * 100) * 500)  # pings count too
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await flooder.receive()
                await until(lambda n=floods: dropped.value("flood") == n, 10, "no flood drop")
            with pytest.raises(InvalidStatus) as refused:  # the address now waits between connections
                async with RawClient.connect(server):
                    pass
            assert refused.value.response.status_code == 429
    run(scenario())


def test_idle_connections_time_out_and_each_address_has_a_limit() -> None:
    async def scenario() -> None:
        async with serve_fake(start_deadline_s=1.0, max_connections_per_ip=3) as server:
            url = f"ws://127.0.0.1:{server.port}/ws"
            idle = [await connect(url) for _ in range(3)]
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url):
                    pass
            assert refused.value.response.status_code == 503
            assert server.metrics.refused.value("connections_per_ip") == 1
            for ws in idle:  # squatters are closed once the start deadline passes
                await asyncio.wait_for(ws.wait_closed(), 15)
                assert ws.close_code == 1008
            assert server.metrics.dropped_clients.value("start_deadline") == 3
            async with RawClient.connect(server) as client:
                await client.start()
                await asyncio.sleep(1.5)  # a started session has no deadline
                await still_streaming(client)
    run(scenario())


def test_serve_flags_set_the_connection_limits() -> None:
    args = build_parser().parse_args(["serve", "--max-connections", "10", "--max-connections-per-ip", "2",
                                      "--start-deadline", "5"])
    config = serve.server_config(args)
    assert (config.max_connections, config.max_connections_per_ip, config.start_deadline_s) == (10, 2, 5.0)


def test_a_client_that_pings_and_never_reads_is_dropped_within_the_send_deadline() -> None:
    """Pongs queue up server-side when the client stops reading; the write-stall check covers them."""
    async def scenario() -> None:
        async with serve_fake(send_timeout_s=1.0, message_rate=100_000, message_burst=100_000) as server:
            async with raw_websocket(server.port) as (_, writer):
                ping = client_frame(Opcode.PING, b"p" * 125)
                deadline = time.monotonic() + 30
                while server.metrics.dropped_clients.value("send_deadline") < 1:
                    assert time.monotonic() < deadline, "a client that never reads was not dropped"
                    writer.write(ping * 200)
                    try:
                        await asyncio.wait_for(writer.drain(), 0.2)
                    except (asyncio.TimeoutError, ConnectionError):
                        await asyncio.sleep(0.1)
                await until(lambda: not server.connections, 10, "the connection is still open")
    run(scenario())


def test_a_slow_reader_gets_fresh_frames() -> None:
    """A reader taking one frame a second: the frame sent when it acknowledges is made at most about one frame
    interval before that ack, not the frame that waited for it all that second."""
    async def scenario() -> None:
        async with serve_fake(max_in_flight=1) as server, RawClient.connect(server) as client:
            await client.start(fps=10)
            acked_ms, lags = None, []
            for _ in range(5):
                data = await client.ws.recv()
                while isinstance(data, str):
                    data = await client.ws.recv()
                header = unpack_frame(data)[0]
                if acked_ms is not None:  # this frame was sent in answer to the last ack
                    lags.append(acked_ms - header.server_time_ms)
                await asyncio.sleep(1.0)  # a slow reader
                acked_ms = time.time() * 1000
                await client.send({"type": "ack", "frame": header.frame_seq})
            lags.sort()
            assert lags[len(lags) // 2] < 300, lags  # 100 ms a frame; one that waited would be ~900 ms old
            assert server.metrics.frames_stale.value() >= 1
    run(scenario())


def test_prompts_that_grow_under_normalisation_are_bad_prompts() -> None:
    async def scenario() -> None:
        async with serve_fake() as server, RawClient.connect(server) as client:
            for grows in ("\u0958" * 300, "\ufb2c" * 300):
                await client.send({"type": "start", "prompt": grows})
                assert (await client.reply())["code"] == "bad_prompt"
            await client.start()
            for grows in ("\u0958" * 300, "\ufb2c" * 300):
                for message in ({"type": "prompt", "prompt": grows}, {"type": "reset", "prompt": grows}):
                    await client.send(message)
                    assert (await client.reply())["code"] == "bad_prompt"
            assert server.metrics.protocol_errors.value("internal") == 0
            await still_streaming(client)
    run(scenario())


def test_a_malformed_origin_is_refused_with_403() -> None:
    async def scenario() -> None:
        async with serve_fake() as server:
            for origin in ("http://[", "http://[::1", "http://:99999"):
                status, _, _ = await asyncio.to_thread(http, f"http://127.0.0.1:{server.port}/ws",
                                                       headers={"Origin": origin})
                assert status == 403, origin
    run(scenario())


def test_http_methods(tmp_path: Any) -> None:
    (tmp_path / "index.html").write_text("<h1>the web client</h1>")
    record_dir = tmp_path / "recordings"
    record_dir.mkdir()
    name = "worldloop-20260101-120000-s1-9f2c4e1a.mp4"
    (record_dir / name).write_bytes(b"\0" * 5000)

    async def scenario() -> None:
        async with serve_fake(web_dir=tmp_path, record_dir=record_dir) as server:
            base = f"http://127.0.0.1:{server.port}"
            for path in ("/", "/healthz", "/metrics", f"/recordings/{name}"):
                got, got_headers, body = await asyncio.to_thread(http, base + path)
                status, headers, head_body = await asyncio.to_thread(http, base + path, "HEAD")
                assert (got, status, head_body) == (200, 200, b""), path
                if path != "/metrics":  # the metrics move between two requests
                    assert headers["Content-Length"] == str(len(body)), path
                for method in ("PUT", "DELETE", "TRACE", "POST", "OPTIONS"):
                    status, headers, _ = await asyncio.to_thread(http, base + path, method)
                    assert status == 405 and headers["Allow"] == "GET, HEAD", (path, method)
            status, headers, _ = await asyncio.to_thread(http, base + "/ws", "DELETE")
            assert status == 405 and headers["Allow"] == "GET"
            assert (await asyncio.to_thread(http, base + "/nothing", "HEAD"))[0] == 404
    run(scenario())


def test_wrong_token_guesses_back_off_per_address() -> None:
    async def scenario() -> None:
        async with serve_fake(token="sesame-1234", token_guess_burst=3, token_guess_rate=0.5) as server:
            url = f"ws://127.0.0.1:{server.port}/ws"
            statuses = []
            for _ in range(5):
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(url, additional_headers={"Authorization": "Bearer wrong-guess"}):
                        pass
                statuses.append(refused.value.response.status_code)
            assert statuses == [401, 401, 401, 429, 429], statuses
            assert "Retry-After" in refused.value.response.headers
            status, _, _ = await asyncio.to_thread(http, f"http://127.0.0.1:{server.port}/metrics",
                                                   headers={"Authorization": "Bearer sesame-1234"})
            assert status == 429  # while backing off even the right token waits
            await asyncio.sleep(2.2)
            async with connect(url, additional_headers={"Authorization": "Bearer sesame-1234"}):
                pass
    run(scenario())


def test_health_and_metrics_show_the_limits_and_the_drops() -> None:
    async def scenario() -> None:
        async with serve_fake(max_connections=7, max_connections_per_ip=5, start_deadline_s=0.5) as server:
            async with connect(f"ws://127.0.0.1:{server.port}/ws") as idle:
                await asyncio.wait_for(idle.wait_closed(), 15)
            base = f"http://127.0.0.1:{server.port}"
            health = json.loads((await asyncio.to_thread(http, base + "/healthz"))[2])
            limits = health["limits"]
            assert (limits["max_connections"], limits["max_connections_per_ip"]) == (7, 5)
            assert limits["start_deadline_s"] == 0.5
            assert health["dropped"] == {"start_deadline": 1}
            text = (await asyncio.to_thread(http, base + "/metrics"))[2].decode()
            assert 'worldloop_limit{name="max_connections"} 7' in text
            assert 'worldloop_clients_dropped_total{reason="start_deadline"} 1' in text
    run(scenario())


def test_token_bucket_and_failure_backoff() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    now[0] += 100.0  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3
    bucket.charge(5)  # may overdraw: the debt is paid back at the rate
    assert bucket.wait_s() == pytest.approx(2.5)
    backoff = FailureBackoff(rate=1.0, burst=2, clock=lambda: now[0], max_addresses=2)
    assert backoff.retry_after("a") == 0
    backoff.failed("a")
    backoff.failed("a")
    assert backoff.retry_after("a") == pytest.approx(1.0) and backoff.retry_after("b") == 0
    backoff.failed("b")
    backoff.failed("c")  # over max_addresses: the oldest entries go
    assert len(backoff) <= 2
