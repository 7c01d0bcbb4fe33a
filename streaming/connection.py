"""One websocket connection: reads and validates client messages, drives its session, owns its sender.

``Connection.run`` is the whole lifetime of one socket. Messages are parsed by ``streaming.protocol`` before
anything else happens; invalid ones get an `error` reply and the connection carries on. How it stays fair:

1. Reading: before each message the connection waits until its message budget is out of debt
   (``streaming.wire``) and there is room for a reply (``Outbox.room``), and it yields after each one, so a
   burst already received neither overflows the reply queue nor holds the event loop.
2. Replies come in request order from one reply task: `keys` and `ack` take effect at once, model commands
   (`prompt`, `reset`, `snapshot`, `restore`, `record`) are rate-limited when read and carried out in order
   by the reply task, so a slow command never stops the connection from reading acks.
3. A connection that has not started a session within ``start_deadline_s`` is closed (1008).

Frames reach the client through the connection's ``Outbox`` task, never through the shared event loop's other
tasks. In ``finally`` the session is detached for a later resume (abrupt disconnect) or ended (clean close).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from worldloop.models.images import read_picture
from worldloop.streaming.config import ServerConfig
from worldloop.streaming.engine import Engine
from worldloop.streaming.limits import TokenBucket
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
    picture_bytes,
)
from worldloop.streaming.registry import LiveSession, SessionRegistry
from worldloop.streaming.replies import Dropped, Reply, ReplyQueue
from worldloop.streaming.session import EngineFull, Frame, SessionClosed, SessionOptions, UnknownSnapshot
from worldloop.streaming.wire import GuardedConnection

log = logging.getLogger(__name__)
CLEAN_CLOSE_CODES = (1000, 1001)  # the client meant to leave: end its session at once
MAX_PENDING_COMMANDS = 4  # model commands waiting for the engine per connection; more are `rate_limited`


class Host(Protocol):
    """What a connection uses of the server that accepted it (``streaming.server.WorldloopServer``)."""

    engine: Engine
    metrics: Metrics
    config: ServerConfig
    registry: SessionRegistry
    stopping: bool


class Connection:
    def __init__(self, ws: GuardedConnection, server: Host) -> None:
        self.ws = ws
        self.server = server
        self.engine = server.engine
        self.metrics = server.metrics
        config = server.config
        self.outbox = Outbox(ws.send, self.metrics, max_in_flight=config.max_in_flight,
                             send_timeout=config.send_timeout_s, ack_timeout=config.ack_timeout_s)
        self.live: LiveSession | None = None
        self.commands = TokenBucket(config.command_rate, config.command_burst)
        self._replies = ReplyQueue(max(1, self.outbox.max_control // 2))
        self._pending_commands = 0
        self._loop = asyncio.get_running_loop()
        self._goodbye: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._start_timer: asyncio.TimerHandle | None = None
        self._last_throttle_notice = -1e9
        ws.on_throttled = self._throttled

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        replier = asyncio.create_task(self._reply_loop())
        self._start_timer = self._loop.call_later(self.server.config.start_deadline_s, self._start_deadline)
        try:
            async for data in self.ws:
                await self.ws.wait_for_budget()
                await self.outbox.room()
                await self._handle(data)
                await asyncio.sleep(0)  # let other connections and the sender run between queued messages
        except ConnectionClosed:
            pass
        finally:
            self._start_timer.cancel()
            replier.cancel()
            self.outbox.stop()
            await asyncio.wait({sender}, timeout=self.server.config.send_timeout_s + 1.0)
            if not sender.done():
                sender.cancel()
            await asyncio.gather(sender, replier, return_exceptions=True)
            if self.ws.stall_reason is not None:
                log.info("dropped a client (%s)", self.ws.stall_reason)
                self.metrics.dropped_clients.inc(self.ws.stall_reason)
            await self._release()

    def _start_deadline(self) -> None:
        if self.live is None and self.ws.state is State.OPEN:
            self.metrics.dropped_clients.inc("start_deadline")
            deadline = self.server.config.start_deadline_s
            reason = f"no session started in {deadline:g} s"
            self._closing = self._loop.create_task(self.ws.close(1008, reason))

    def _throttled(self) -> None:
        """The client overdrew its message budget (at most one notice a second)."""
        self.metrics.throttled.inc()
        now = time.monotonic()
        if now - self._last_throttle_notice >= 1.0:
            self._last_throttle_notice = now
            c = self.server.config
            self._error(ProtocolError("rate_limited", f"more than {c.message_rate:g} messages a second "
                                      f"after a burst of {c.message_burst}: this connection is now read "
                                      "more slowly"))

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
        outgoing = OutgoingFrame(frame.seq, pack_frame(frame.header(), frame.payload), frame.started_at,
                                 time.monotonic())
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
        reply: Reply
        try:
            message = parse_client_message(data)
            if isinstance(message, Start):
                await self._replies.idle()  # earlier replies first, then `ready`, then frames
                try:
                    await self._start(message)
                except ProtocolError:
                    if self.live is None:  # refused: the client's start deadline runs again
                        self._start_timer = self._loop.call_later(self.server.config.start_deadline_s,
                                                                  self._start_deadline)
                    raise
                return
            reply = self._dispatch(message)
        except ProtocolError as err:
            reply = err
        if reply is not None:
            await self._replies.put(reply)

    def _dispatch(self, message: ClientMessage) -> Reply | None:
        """Apply `ack` and `keys` now; return what answers the others (a command is carried out later)."""
        if isinstance(message, Ack):
            self.outbox.ack(message.frame)
            return None
        live = self._require_session(message.type)
        if isinstance(message, Keys):
            live.handle.set_keys(message.keys, message.seq)
            return None
        if isinstance(message, StatsRequest):
            return lambda: self._stats(live)
        if self._pending_commands >= MAX_PENDING_COMMANDS or not self.commands.take():
            return Dropped(message.type)
        self._pending_commands += 1
        return lambda: self._command(live, message)

    async def _reply_loop(self) -> None:
        while True:
            reply = await self._replies.take()
            try:
                if callable(reply):
                    reply = await reply()
            except ProtocolError as err:
                reply = err
            except Exception as err:  # a bug: say so, and keep answering
                log.exception("answering a request failed")
                reply = ProtocolError("internal", f"the request failed: {err}")
            if isinstance(reply, Dropped):
                c = self.server.config
                what = f"this `{reply.request}` was" if reply.count == 1 else \
                    f"{reply.count} `{reply.request}` commands in a row were"
                reply = ProtocolError("rate_limited", f"at most {c.command_rate:g} commands a second after a "
                                      f"burst of {c.command_burst}, {MAX_PENDING_COMMANDS} waiting; {what} "
                                      "dropped", request=reply.request)
            if isinstance(reply, ProtocolError):
                self._error(reply)
            else:
                self._post(reply)
            await self._replies.done()

    def _require_session(self, request: str) -> LiveSession:
        if self.live is None:
            raise ProtocolError("no_session", "send `start` first", request=request)
        return self.live

    async def _command(self, live: LiveSession, message: ClientMessage) -> ServerMessage:
        try:
            return await self._carry_out(live, message)
        finally:
            self._pending_commands -= 1

    async def _carry_out(self, live: LiveSession, message: ClientMessage) -> ServerMessage:
        handle = live.handle
        if isinstance(message, SetPrompt):
            return Done(request="prompt", frame=await self._wait(handle.set_prompt(message.prompt), "prompt"))
        if isinstance(message, Reset):
            picture = await self._picture(message.first_frame, "reset")
            try:
                reset = handle.reset(message.prompt, message.seed, message.start_from, picture)
            except ValueError as err:
                raise ProtocolError("unsupported", str(err), request="reset") from None
            return Done(request="reset", frame=await self._wait(reset, "reset"))
        if isinstance(message, TakeSnapshot):
            snapshot_id, frame = await self._wait(handle.snapshot(), "snapshot")
            return Snapshot(id=snapshot_id, frame=frame)
        if isinstance(message, Restore):
            return Done(request="restore", frame=await self._wait(handle.restore(message.id), "restore"))
        assert isinstance(message, Record), message
        return await self._record(live, message)

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

    async def _record(self, live: LiveSession, message: Record) -> Recording:
        registry = self.server.registry
        if message.action == "start":
            name = await self._wait_record(registry.start_recording(live))
            return Recording(state="started", name=name, url=f"/recordings/{name}")
        info = await self._wait_record(registry.stop_recording(live))
        if info is None:
            raise ProtocolError("bad_field", "this session is not being recorded", request="record")
        return Recording(state="stopped", name=info.name, url=f"/recordings/{info.name}", frames=info.frames)

    async def _wait_record(self, operation: Any) -> Any:
        try:
            return await operation
        except ProtocolError:
            raise
        except Exception as err:
            log.exception("recording failed")
            raise ProtocolError("internal", f"recording failed: {err}", request="record") from None

    async def _stats(self, live: LiveSession) -> Stats:
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
        if self._start_timer is not None:  # the deadline is the client's: preparing a world start takes ours
            self._start_timer.cancel()
        if message.session is not None:
            live = registry.attach(message.session, self)
            resumed = True
        else:
            picture = await self._picture(message.first_frame, "start")
            options = SessionOptions(message.prompt, message.seed, message.fps, message.format,
                                     message.quality, start_from=message.start_from, picture=picture)
            try:
                handle = self.engine.open_session(options, paused=True)
            except EngineFull as err:
                await self._refuse_full(str(err))
                return
            except ValueError as err:  # a start this server cannot make
                raise ProtocolError("unsupported", str(err), request="start") from None
            try:
                await asyncio.wrap_future(handle.started)
            except Exception as err:
                raise ProtocolError("internal", f"could not start the session: {err}",
                                    request="start") from None
            live = registry.add(handle, options, self)
            resumed = False
        self._attach(live, resumed)

    async def _picture(self, first_frame: str | None, request: str) -> np.ndarray | None:
        """A `first_frame` field as a picture at the model's frame size (decoded off the event loop)."""
        if first_frame is None:
            return None
        height, width = self.engine.frame_shape
        try:
            return await asyncio.to_thread(read_picture, picture_bytes(first_frame), height, width)
        except ValueError as err:
            raise ProtocolError("bad_image", str(err), request=request) from None

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
                         trained=self.engine.trained, start_from=handle.start_from))
        self.live = live
        if self._start_timer is not None:
            self._start_timer.cancel()
        self.outbox.max_frame_age = 1.0 / handle.fps
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
