"""The worldloop server: HTTP routes and the websocket endpoint ``/ws`` around a running ``Engine``.

The server only accepts and routes: access checks and plain-HTTP routes happen in the handshake hook
(``streaming.http``); each websocket becomes a ``Connection`` (streaming/connection.py); sessions live in the
``SessionRegistry``. ``run_server`` adds signal handling: on SIGTERM/SIGINT clients get `bye`, recordings are
finished and the engine thread is stopped.

    engine = Engine(model).start()
    asyncio.run(run_server(engine, ServerConfig(port=8765, web_dir=Path("app/web"))))
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from worldloop.streaming import http
from worldloop.streaming.config import ServerConfig
from worldloop.streaming.connection import Connection
from worldloop.streaming.engine import Engine
from worldloop.streaming.protocol import PROTOCOL_VERSION, SUBPROTOCOL, check_access_token
from worldloop.streaming.registry import SessionRegistry

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
        self._server = await serve(
            self._handle, c.host, c.port, process_request=self._route, select_subprotocol=_select_subprotocol,
            compression=None, max_size=c.transport_max_bytes, ping_interval=c.ping_interval_s,
            ping_timeout=c.ping_interval_s, close_timeout=2.0, server_header="worldloop",
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
    async def _handle(self, ws: ServerConnection) -> None:
        if self.stopping:
            await ws.close(1001, "server shutting down")
            return
        connection = Connection(ws, self)
        self.connections.add(connection)
        self.metrics.connections.set(len(self.connections))
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            self.metrics.connections.set(len(self.connections))

    # ---- HTTP ----
    async def _route(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        headers = request.headers
        if not self.policy.host_allowed(headers.get("Host")):
            return self._refuse("host", 403, "this server does not answer to that Host name")
        if path == "/ws":
            return self._admit(request)
        if path == "/healthz":
            return self._health()
        if path == "/metrics":
            if not self.policy.token_ok(headers.get("Authorization")):
                return self._refuse_token()
            return http.response(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        if path.startswith("/recordings/"):
            if not self.policy.token_ok(headers.get("Authorization")):
                return self._refuse_token()
            found = http.recording_file(self.config.record_dir, path, self.registry.active_recordings())
            if found is None:
                return http.error_response(404, "no such finished recording")
            return await asyncio.to_thread(http.file_response, found, found.name)
        return await self._static(path)

    def _admit(self, request: Request) -> Response | None:
        headers = request.headers
        if not self.policy.origin_allowed(headers.get("Origin"), headers.get("Host")):
            return self._refuse("origin", 403, "origin not allowed (see --allow-origin)")
        if not self.policy.token_ok(headers.get("Authorization"), http.offered_subprotocols(headers)):
            return self._refuse_token()
        if self.stopping:
            return self._refuse("shutdown", 503, "the server is shutting down")
        if len(self.connections) >= self.config.max_connections:
            return self._refuse("connections", 503, "too many connections")
        return None  # go on with the websocket handshake

    def _refuse(self, reason: str, status: int, message: str) -> Response:
        self.metrics.refused.inc(reason)
        return http.error_response(status, message)

    def _refuse_token(self) -> Response:
        self.metrics.refused.inc("token")
        return http.unauthorized()

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
        })

    async def _static(self, path: str) -> Response:
        web_dir = self.config.web_dir
        if web_dir is None or not web_dir.is_dir():
            if path in ("/", "/index.html"):
                return http.response(200, http.fallback_page(web_dir), "text/html; charset=utf-8")
            return http.error_response(404, "not found")
        found = http.static_path(web_dir, path)
        if found is None:
            return http.error_response(404, "not found")
        return await asyncio.to_thread(http.file_response, found)


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
