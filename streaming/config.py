"""The websocket server's settings, shared by the server (``streaming/server.py``) and its connections."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


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
    # Larger messages close the socket (1009); the protocol's limits are 4 KiB, 96 KiB with a first frame.
    transport_max_bytes: int = 128 * 1024
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
