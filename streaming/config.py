"""The websocket server's settings, shared by the server (``streaming/server.py``) and its connections."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port (see WorldloopServer.port)
    token: str | None = None  # required on /ws, /metrics, /recordings (see streaming.http.AccessPolicy)
    allowed_origins: tuple[str, ...] = ()  # beyond same-origin and localhost; "*" allows any
    web_dir: Path | None = None  # the browser client's static files
    record_dir: Path | None = None  # recordings are off without one
    max_connections: int = 64
    max_in_flight: int = 2  # unacknowledged frames per connection
    send_timeout_s: float = 3.0  # a send slower than this drops the client
    ack_timeout_s: float = 5.0  # a frame unacknowledged for this long drops the client
    resume_grace_s: float = 10.0  # how long a dropped connection's session waits to be resumed
    ping_interval_s: float | None = 10.0
    transport_max_bytes: int = 64 * 1024  # larger messages close the socket (1009); protocol limit is 4 KiB
    command_rate: float = 5.0  # model commands (prompt, reset, snapshot, restore, record) per second…
    command_burst: int = 10  # …after a burst of this many; more are answered `rate_limited`

    def __post_init__(self) -> None:
        if self.command_rate <= 0 or self.command_burst < 1:
            raise ValueError("command_rate must be > 0 and command_burst >= 1")
