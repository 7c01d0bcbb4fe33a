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

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from worldloop.streaming import http
from worldloop.streaming.config import ServerConfig
from worldloop.streaming.connection import Connection
from worldloop.streaming.engine import Engine
from worldloop.streaming.limits import FailureBackoff
from worldloop.streaming.protocol import PROTOCOL_VERSION, SUBPROTOCOL, check_access_token
from worldloop.streaming.registry import SessionRegistry
from worldloop.streaming.wire import GuardedConnection, WireLimits

log = logging.getLogger(__name__)


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
