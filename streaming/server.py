"""The worldloop server: HTTP routes and the websocket endpoint ``/ws`` around a running ``Engine``.

The server only accepts and routes: access checks, connection limits (in all, per client address) and
plain-HTTP routes happen in the handshake hook (``streaming.http``); each websocket is a ``GuardedConnection``
(streaming/wire.py: message budget, write stalls) driven by a ``Connection`` (streaming/connection.py);
sessions live in the ``SessionRegistry``. ``run_server`` adds signal handling: on SIGTERM/SIGINT clients
get `bye`, recordings are finished and the engine thread is stopped.

    engine = Engine(model).start()
    asyncio.run(run_server(engine, ServerConfig(port=8765, web_dir=Path("app/web"))))
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from streaming import http
from streaming.connection import Connection
from streaming.engine import Engine
from streaming.limits import FailureBackoff
from streaming.protocol import PROTOCOL_VERSION, SUBPROTOCOL, check_access_token
from streaming.registry import SessionRegistry
from streaming.wire import GuardedConnection, WireLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (see WorldloopServer.port)
    token: str | None = None  # required on /ws, /metrics, /recordings (see streaming.http.AccessPolicy)
    allowed_origins: tuple[str, ...] = ()  # beyond same-origin and localhost; "*" allows any
    web_dir: Path | None = None  # the browser client's static files
    record_dir: Path | None = None  # recordings are off without one
    max_connections: int = 64  # open websockets in all…
    max_connections_per_ip: int = 16  # …and from one client address
    start_deadline_s: float = 10.0  # a connection without a session after this is closed (1008)
    max_in_flight: int = 2  # unacknowledged frames per connection
    send_timeout_s: float = 3.0  # a send slower than this drops the client
    ack_timeout_s: float = 5.0  # a frame unacknowledged for this long drops the client
    resume_grace_s: float = 10.0  # how long a dropped connection's session waits to be resumed
    ping_interval_s: float | None = 10.0
    transport_max_bytes: int = 64 * 1024  # larger messages close the socket (1009); protocol limit is 4 KiB
    command_rate: float = 5.0  # model commands (prompt, reset, snapshot, restore, record) per second…
    command_burst: int = 10  # …after a burst of this many; more are answered `rate_limited`
    message_rate: float = 200.0  # inbound websocket frames of any kind per second per connection…
    message_burst: int = 400  # …after a burst of this many; over it the socket is read more slowly
    token_guess_rate: float = 0.2  # wrong access tokens per second per client address…
    token_guess_burst: int = 10  # …after this many; then the address gets 429 until it may guess again
    flood_backoff_s: float = 10.0  # after 2 connections closed for flooding, one more per this many seconds

    def __post_init__(self) -> None:
        if min(self.command_rate, self.message_rate, self.token_guess_rate) <= 0 or \
                min(self.command_burst, self.message_burst, self.token_guess_burst) < 1:
            raise ValueError("rates must be > 0 and bursts >= 1")
        if self.flood_backoff_s <= 0:
            raise ValueError("flood_backoff_s must be > 0")
        if self.max_connections < 1 or self.max_connections_per_ip < 1 or self.start_deadline_s <= 0:
            raise ValueError("max_connections and max_connections_per_ip must be >= 1, start_deadline_s > 0")

    def limits(self) -> dict[str, float]:
        """The limits a client may run into, as /healthz and /metrics show them."""
        names = ("max_connections", "max_connections_per_ip", "start_deadline_s", "max_in_flight",
                 "send_timeout_s", "ack_timeout_s", "command_rate", "command_burst", "message_rate",
                 "message_burst", "token_guess_rate", "token_guess_burst", "flood_backoff_s")
        return {name: value for name, value in asdict(self).items() if name in names}


class WorldloopServer:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        if config.token is not None:
            check_access_token(config.token)
        self.engine = engine
        self.config = config
        self.metrics = engine.metrics
        self.registry = SessionRegistry(engine, grace_s=config.resume_grace_s, record_dir=config.record_dir)
        self.connections: set[Connection] = set()
        self.per_address: Counter[str] = Counter()  # open connections by client address
        self.guesses = FailureBackoff(config.token_guess_rate, config.token_guess_burst)
        self.floods = FailureBackoff(1.0 / config.flood_backoff_s, 2)  # addresses whose clients flooded
        self.metrics.limits.values.update(config.limits())
        self.stopping = False
        self.started_at = time.monotonic()
        self.policy = http.AccessPolicy(config.host, config.port, frozenset(config.allowed_origins),
                                        config.token)
        self._server: Server | None = None
        if config.record_dir is not None:
            config.record_dir.mkdir(parents=True, exist_ok=True)

    @property
    def port(self) -> int:
        assert self._server is not None, "the server has not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}/"

    async def start(self) -> WorldloopServer:
        c = self.config
        wire = WireLimits(c.message_rate, c.message_burst, c.send_timeout_s)
        self._server = await serve(
            self._handle, c.host, c.port, process_request=self._route, select_subprotocol=_select_subprotocol,
            compression=None, max_size=c.transport_max_bytes, ping_interval=c.ping_interval_s,
            ping_timeout=c.ping_interval_s, close_timeout=2.0, server_header="worldloop",
            create_connection=functools.partial(GuardedConnection, limits=wire),  # type: ignore[arg-type]
        )
        self.policy = http.AccessPolicy(c.host, self.port, frozenset(c.allowed_origins), c.token)
        return self

    async def __aenter__(self) -> WorldloopServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Say `bye` to every client, finish every session and recording; the engine keeps running."""
        if self.stopping:
            return
        self.stopping = True
        if self._server is not None:
            self._server.close(close_connections=False)
        await asyncio.gather(*(c.say_goodbye("shutdown") for c in list(self.connections)),
                             return_exceptions=True)
        await self.registry.close_all()
        if self._server is not None:
            await self._server.wait_closed()

    # ---- websocket ----
    async def _handle(self, ws: GuardedConnection) -> None:
        if self.stopping:
            await ws.close(1001, "server shutting down")
            return
        connection = Connection(ws, self)
        address = _address(ws)
        self.connections.add(connection)
        self.per_address[address] += 1
        self.metrics.connections.set(len(self.connections))
        try:
            await connection.run()
        finally:
            if ws.stall_reason == "flood":
                self.floods.failed(address)
            self.connections.discard(connection)
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]
            self.metrics.connections.set(len(self.connections))

    # ---- HTTP ----
    async def _route(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        headers = request.headers
        if not self.policy.host_allowed(headers.get("Host")):
            return self._refuse("host", 403, "this server does not answer to that Host name")
        if path == "/ws":
            if request.method != "GET":
                return http.method_not_allowed("GET")
            return self._admit(ws, request)
        if request.method not in ("GET", "HEAD"):
            return http.method_not_allowed("GET, HEAD")
        answer = await self._answer(ws, path, request)
        return http.head_only(answer) if request.method == "HEAD" else answer

    async def _answer(self, ws: ServerConnection, path: str, request: Request) -> Response:
        """GET (and HEAD) on everything but ``/ws``."""
        if path == "/healthz":
            return self._health()
        if path == "/metrics" or path.startswith("/recordings/"):
            refused = self._check_token(ws, request.headers.get("Authorization"))
            if refused is not None:
                return refused
            if path == "/metrics":
                return http.response(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
            found = http.recording_file(self.config.record_dir, path, self.registry.active_recordings())
            if found is None:
                return http.error_response(404, "no such finished recording")
            return await asyncio.to_thread(http.file_response, found, found.name, request.method == "HEAD")
        return await self._static(path, request.method == "HEAD")

    def _admit(self, ws: ServerConnection, request: Request) -> Response | None:
        headers = request.headers
        if not self.policy.origin_allowed(headers.get("Origin"), headers.get("Host")):
            return self._refuse("origin", 403, "origin not allowed (see --allow-origin)")
        refused = self._check_token(ws, headers.get("Authorization"), http.offered_subprotocols(headers))
        if refused is not None:
            return refused
        if self.stopping:
            return self._refuse("shutdown", 503, "the server is shutting down")
        wait = self.floods.retry_after(_address(ws))
        if wait > 0:
            self.metrics.refused.inc("flood_backoff")
            return http.too_many_requests(wait, "connections from your address flooded the server")
        if len(self.connections) >= self.config.max_connections:
            return self._refuse("connections", 503, "too many connections")
        if self.per_address[_address(ws)] >= self.config.max_connections_per_ip:
            return self._refuse("connections_per_ip", 503, "too many connections from your address")
        return None  # go on with the websocket handshake

    def _check_token(self, ws: ServerConnection, authorization: str | None,
                     subprotocols: Sequence[str] = ()) -> Response | None:
        """None when the token is right (or none is needed); else 401, or 429 while the address backs off."""
        address = _address(ws)
        wait = self.guesses.retry_after(address)
        if wait > 0:
            self.metrics.refused.inc("token_backoff")
            return http.too_many_requests(wait, "too many wrong access tokens from your address")
        if self.policy.token_ok(authorization, subprotocols):
            return None
        self.guesses.failed(address)
        self.metrics.refused.inc("token")
        return http.unauthorized()

    def _refuse(self, reason: str, status: int, message: str) -> Response:
        self.metrics.refused.inc(reason)
        return http.error_response(status, message)

    def _health(self) -> Response:
        healthy = self.engine.running and not self.stopping
        return http.json_response(200 if healthy else 503, {
            "status": "ok" if healthy else "unavailable",
            "protocol": PROTOCOL_VERSION,
            "model": self.engine.model_name,
            "device": self.engine.device,
            "trained": self.engine.trained,
            "sessions": self.engine.session_count,
            "max_sessions": self.engine.max_sessions,
            "connections": len(self.connections),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "limits": self.config.limits(),
            "dropped": self.metrics.dropped_clients.by_label(),
            "refused": self.metrics.refused.by_label(),
            "throttled": self.metrics.throttled.value(),
        })

    async def _static(self, path: str, head: bool = False) -> Response:
        web_dir = self.config.web_dir
        if web_dir is None or not web_dir.is_dir():
            if path in ("/", "/index.html"):
                return http.response(200, http.fallback_page(web_dir), "text/html; charset=utf-8")
            return http.error_response(404, "not found")
        found = http.static_path(web_dir, path)
        if found is None:
            return http.error_response(404, "not found")
        return await asyncio.to_thread(http.file_response, found, None, head)


def _address(ws: ServerConnection) -> str:
    """The client's IP address (the unit of the per-address limits)."""
    peer = ws.remote_address
    return str(peer[0]) if peer else "unknown"


def _select_subprotocol(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """``worldloop.v1`` when offered, else none (programs need not offer any); never the token."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None


async def run_server(engine: Engine, config: ServerConfig,
                     on_ready: Callable[[WorldloopServer], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully: `bye`, recordings, engine."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    server = WorldloopServer(engine, config)
    try:
        await server.start()
        if on_ready is not None:
            on_ready(server)
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.close()
        await asyncio.to_thread(engine.close)
        for sig in signals:
            loop.remove_signal_handler(sig)
