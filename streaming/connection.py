"""One websocket connection: reads and validates client messages, drives its session, owns its sender.

``Connection.run`` is the whole lifetime of one socket. Messages are parsed by ``streaming.protocol`` before
anything else happens; invalid ones get an `error` reply and the connection carries on. Frames reach the
client through the connection's ``Outbox`` task, never through the shared event loop's other tasks. In
``finally`` the session is detached for a later resume (abrupt disconnect) or ended (clean close).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from worldloop.streaming.config import ServerConfig
from worldloop.streaming.engine import Engine
from worldloop.streaming.metrics import Metrics
from worldloop.streaming.outbox import Outbox, OutgoingFrame, Stalled
from worldloop.streaming.protocol import (
    Ack,
    Bye,
    ClientMessage,
    Done,
    Keys,
    ProtocolError,
    Ready,
    Record,
    Recording,
    Reset,
    Restore,
    ServerMessage,
    SetPrompt,
    Snapshot,
    Start,
    Stats,
    StatsRequest,
    TakeSnapshot,
    encode_message,
    pack_frame,
    parse_client_message,
)
from worldloop.streaming.registry import LiveSession, SessionRegistry
from worldloop.streaming.session import EngineFull, Frame, SessionClosed, SessionOptions, UnknownSnapshot

log = logging.getLogger(__name__)
CLEAN_CLOSE_CODES = (1000, 1001)  # the client meant to leave: end its session at once


class TokenBucket:
    """``rate`` events per second on average after a burst of ``burst``: ``take`` says whether one may go."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.last = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Host(Protocol):
    """What a connection uses of the server that accepted it (``streaming.server.WorldloopServer``)."""

    engine: Engine
    metrics: Metrics
    config: ServerConfig
    registry: SessionRegistry
    stopping: bool


class Connection:
    def __init__(self, ws: ServerConnection, server: Host) -> None:
        self.ws = ws
        self.server = server
        self.engine = server.engine
        self.metrics = server.metrics
        config = server.config
        self.outbox = Outbox(ws.send, self.metrics, max_in_flight=config.max_in_flight,
                             send_timeout=config.send_timeout_s, ack_timeout=config.ack_timeout_s)
        self.live: LiveSession | None = None
        self.commands = TokenBucket(config.command_rate, config.command_burst)
        self._loop = asyncio.get_running_loop()
        self._goodbye: asyncio.Task[None] | None = None

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        try:
            async for data in self.ws:
                await self._handle(data)
        except ConnectionClosed:
            pass
        finally:
            self.outbox.stop()
            await asyncio.wait({sender}, timeout=self.server.config.send_timeout_s + 1.0)
            if not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            await self._release()

    async def say_goodbye(self, reason: str, code: int = 1001) -> None:
        """Send `bye` (waiting briefly for the client to take it) and close the socket."""
        if self.ws.state is not State.OPEN:
            return
        self.outbox.post(encode_message(Bye(reason=reason)))  # type: ignore[arg-type]
        await self.outbox.drain(1.0)
        await self.ws.close(code, reason)

    # ---- sending ----
    def _post(self, message: ServerMessage) -> None:
        self.outbox.post(encode_message(message))

    def _error(self, err: ProtocolError) -> None:
        self.metrics.protocol_errors.inc(err.code)
        self._post(err.to_message())

    async def _send_loop(self) -> None:
        try:
            await self.outbox.run()
        except Stalled as stall:
            log.info("dropping a stalled client (%s)", stall.reason)
            self.metrics.dropped_clients.inc(stall.reason)
            self.ws.transport.abort()
        except ConnectionClosed:
            pass

    def _on_frame(self, frame: Frame) -> None:
        """Called on the encoder pool: pack the message there, hand it to the loop."""
        outgoing = OutgoingFrame(frame.seq, pack_frame(frame.header(), frame.payload), frame.started_at)
        try:
            self._loop.call_soon_threadsafe(self.outbox.offer, outgoing)
        except RuntimeError:  # the loop has closed
            self.metrics.frames_dropped.inc()

    def _on_backpressure(self, paused: bool) -> None:
        if self.live is not None:
            self.live.handle.paused = paused

    def session_replaced(self) -> None:
        """Another connection resumed our session."""
        self.live = None
        self.outbox.on_backpressure = lambda paused: None
        self.outbox.clear_frames()
        self._goodbye = self._loop.create_task(self.say_goodbye("replaced", 1000))

    # ---- receiving ----
    async def _handle(self, data: str | bytes) -> None:
        try:
            await self._dispatch(parse_client_message(data))
        except ProtocolError as err:
            self._error(err)

    async def _dispatch(self, message: ClientMessage) -> None:
        if isinstance(message, Ack):
            self.outbox.ack(message.frame)
        elif isinstance(message, Start):
            await self._start(message)
        else:
            live = self._require_session(message.type)
            if isinstance(message, Keys):
                live.handle.set_keys(message.keys, message.seq)
            elif isinstance(message, StatsRequest):
                self._post(self._stats(live))
            else:
                if not self.commands.take():
                    c = self.server.config
                    raise ProtocolError("rate_limited", f"at most {c.command_rate:g} commands a second "
                                        f"after a burst of {c.command_burst}; this `{message.type}` was "
                                        "dropped", request=message.type)
                await self._command(live, message)

    def _require_session(self, request: str) -> LiveSession:
        if self.live is None:
            raise ProtocolError("no_session", "send `start` first", request=request)
        return self.live

    async def _command(self, live: LiveSession, message: ClientMessage) -> None:
        handle = live.handle
        if isinstance(message, SetPrompt):
            frame = await self._wait(handle.set_prompt(message.prompt), "prompt")
            self._post(Done(request="prompt", frame=frame))
        elif isinstance(message, Reset):
            frame = await self._wait(handle.reset(message.prompt, message.seed), "reset")
            self._post(Done(request="reset", frame=frame))
        elif isinstance(message, TakeSnapshot):
            snapshot_id, frame = await self._wait(handle.snapshot(), "snapshot")
            self._post(Snapshot(id=snapshot_id, frame=frame))
        elif isinstance(message, Restore):
            frame = await self._wait(handle.restore(message.id), "restore")
            self._post(Done(request="restore", frame=frame))
        elif isinstance(message, Record):
            await self._record(live, message)

    async def _wait(self, future: Any, request: str) -> Any:
        """Await an engine command, turning its failures into protocol errors."""
        try:
            return await asyncio.wrap_future(future)
        except UnknownSnapshot as err:
            raise ProtocolError("unknown_snapshot", str(err), request=request) from None
        except SessionClosed as err:
            raise ProtocolError("no_session", str(err), request=request) from None
        except Exception as err:
            log.exception("%s failed", request)
            raise ProtocolError("internal", f"{request} failed: {err}", request=request) from None

    async def _record(self, live: LiveSession, message: Record) -> None:
        registry = self.server.registry
        if message.action == "start":
            name = await self._wait_record(registry.start_recording(live))
            self._post(Recording(state="started", name=name, url=f"/recordings/{name}"))
        else:
            info = await self._wait_record(registry.stop_recording(live))
            if info is None:
                raise ProtocolError("bad_field", "this session is not being recorded", request="record")
            self._post(Recording(state="stopped", name=info.name, url=f"/recordings/{info.name}",
                                 frames=info.frames))

    async def _wait_record(self, operation: Any) -> Any:
        try:
            return await operation
        except ProtocolError:
            raise
        except Exception as err:
            log.exception("recording failed")
            raise ProtocolError("internal", f"recording failed: {err}", request="record") from None

    def _stats(self, live: LiveSession) -> Stats:
        s = live.handle.stats()
        return Stats(frame=s.frame, frames_generated=s.frames_generated,
                     frames_sent=self.outbox.sent, frames_dropped=self.outbox.dropped,
                     deadlines_missed=s.deadlines_missed, speculative_kept=s.speculative_kept,
                     speculative_discarded=s.speculative_discarded, fps=round(s.fps, 2),
                     in_flight=self.outbox.in_flight, sessions=self.engine.session_count)

    # ---- session lifetime ----
    async def _start(self, message: Start) -> None:
        if self.live is not None:
            raise ProtocolError("already_started", "this connection already has a session", request="start")
        if message.steps is not None and message.steps != self.engine.steps:
            raise ProtocolError("unsupported", f"this server makes every frame in {self.engine.steps} "
                                "denoising step(s); leave `steps` out or send that number", request="start")
        registry = self.server.registry
        if message.session is not None:
            live = registry.attach(message.session, self)
            resumed = True
        else:
            options = SessionOptions(message.prompt, message.seed, message.fps, message.format,
                                     message.quality)
            try:
                handle = self.engine.open_session(options, paused=True)
            except EngineFull as err:
                await self._refuse_full(str(err))
                return
            try:
                await asyncio.wrap_future(handle.started)
            except Exception as err:
                raise ProtocolError("internal", f"could not start the session: {err}",
                                    request="start") from None
            live = registry.add(handle, options, self)
            resumed = False
        self._attach(live, resumed)

    async def _refuse_full(self, reason: str) -> None:
        self.metrics.refused.inc("full")
        self._error(ProtocolError("server_full", f"{reason}; try again later", request="start"))
        await self.outbox.drain(1.0)
        await self.ws.close(1013, "server full")

    def _attach(self, live: LiveSession, resumed: bool) -> None:
        handle = live.handle
        height, width = self.engine.frame_shape
        self._post(Ready(session=live.resume_id, model=self.engine.model_name, device=self.engine.device,
                         width=width, height=height, fps=handle.fps, steps=self.engine.steps,
                         format=live.options.image_format, prompt=handle.prompt, seed=handle.seed,  # type: ignore
                         resumed=resumed, max_in_flight=self.outbox.max_in_flight,
                         trained=self.engine.trained))
        self.live = live
        self.outbox.clear_frames()
        self.outbox.on_backpressure = self._on_backpressure
        handle.on_frame = self._on_frame
        handle.paused = False

    def session_lost(self, error: BaseException) -> None:
        """The engine ended our session after a model error; the client may `start` again."""
        self.live = None
        self.outbox.on_backpressure = lambda paused: None
        self._error(ProtocolError("internal", f"the session ended: {error}"))

    async def _release(self) -> None:
        live, self.live = self.live, None
        self.outbox.on_backpressure = lambda paused: None
        if live is None or self.server.stopping:
            return
        received = self.ws.protocol.close_rcvd
        if received is not None and received.code in CLEAN_CLOSE_CODES:
            await self.server.registry.end(live)
        else:
            self.server.registry.detach(live, self)
