"""Server metrics: a few thread-safe instruments and their Prometheus text exposition (format 0.0.4).

One ``Metrics`` object per engine/server (never module-level): the engine thread, the encoder pool and the
event loop all update it; ``render()`` produces the `/metrics` page.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing count, optionally split by label values."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def by_label(self) -> dict[str, float]:
        """Counts by the (single) label's value."""
        with self._lock:
            return {k[0]: v for k, v in sorted(self._values.items()) if len(k) == 1}

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge:
    """A value that goes up and down; either set directly or read from a callback at render time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float] | None = None) -> None:
        self.name, self.help = name, help
        self._read = read
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def value(self) -> float:
        return float(self._read()) if self._read is not None else self._value

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(self.value())}"]


class Settings:
    """Fixed numbers (limits, configuration) as one gauge labelled by ``name``."""

    kind = "gauge"

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self.values: dict[str, float] = {}

    def samples(self) -> list[str]:
        return [f'{self.name}{{name="{_escape(k)}"}} {_number(v)}' for k, v in sorted(self.values.items())]


class Histogram:
    """Cumulative-bucket histogram of observations (seconds)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def samples(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, running = [], 0
        for bound, n in zip(self.bounds, counts, strict=True):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {running}"]
        return lines


class RateMeter:
    """Events per second over a sliding window (used for the FPS gauges)."""

    def __init__(self, window_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()
        self._lock = threading.Lock()
        self._since = clock()

    def tick(self) -> None:
        with self._lock:
            self._times.append(self._clock())
            self._trim()

    def rate(self) -> float:
        """Events per second over the window (over the meter's age while that is shorter)."""
        with self._lock:
            self._trim()
            span = min(self.window_s, self._clock() - self._since)
            return len(self._times) / span if span > 0 else 0.0

    def _trim(self) -> None:
        horizon = self._clock() - self.window_s
        while self._times and self._times[0] < horizon:
            self._times.popleft()


LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Every instrument the engine and server report; `render()` is the `/metrics` body."""

    def __init__(self) -> None:
        self.generated_rate = RateMeter()
        self.sessions = Gauge("worldloop_sessions", "Sessions live in the engine (attached or detached).")
        self.detached = Gauge("worldloop_sessions_detached", "Sessions waiting to be resumed after a drop.")
        self.connections = Gauge("worldloop_connections", "Open websocket connections.")
        self.recordings = Gauge("worldloop_recordings_active", "Recordings being written.")
        self.fps = Gauge("worldloop_fps", "Frames generated per second over the last 2 s, all sessions.",
                         read=self.generated_rate.rate)
        self.step_seconds = Histogram("worldloop_step_seconds", "Duration of one batched model step.",
                                      LATENCY_BUCKETS)
        self.frame_latency = Histogram(
            "worldloop_frame_latency_seconds",
            "From the start of the model step that made a frame to the end of its websocket send.",
            LATENCY_BUCKETS)
        self.frames_generated = Counter("worldloop_frames_generated_total", "Frames generated (committed).")
        self.frames_sent = Counter("worldloop_frames_sent_total", "Frames sent to clients.")
        self.frames_dropped = Counter("worldloop_frames_dropped_total",
                                      "Frames generated but never sent (replaced by a newer one, or stale).")
        self.frames_stale = Counter("worldloop_frames_stale_total",
                                    "Frames dropped because they waited over a frame interval for a slow "
                                    "reader (a fresh one is made instead).")
        self.deadlines_missed = Counter("worldloop_deadlines_missed_total",
                                        "Frame deadlines skipped because generation ran late.")
        self.speculative = Counter("worldloop_speculative_frames_total",
                                   "Speculative frames by outcome (kept or discarded).",
                                   labels=("outcome",))
        self.refused = Counter("worldloop_refused_total", "Connections or sessions refused, by reason.",
                               labels=("reason",))
        self.dropped_clients = Counter("worldloop_clients_dropped_total",
                                       "Connections aborted by the server, by reason.", labels=("reason",))
        self.throttled = Counter("worldloop_connections_throttled_total",
                                 "Times a connection overdrew its message budget and was read more slowly.")
        self.limits = Settings("worldloop_limit", "The server's limits (connections, deadlines, rates).")
        self.protocol_errors = Counter("worldloop_protocol_errors_total", "Error replies sent, by code.",
                                       labels=("code",))

    def instruments(self) -> list[Counter | Gauge | Histogram | Settings]:
        return [v for v in vars(self).values() if isinstance(v, Counter | Gauge | Histogram | Settings)]

    def render(self) -> str:
        lines: list[str] = []
        for item in self.instruments():
            lines += [f"# HELP {item.name} {item.help}", f"# TYPE {item.name} {item.kind}", *item.samples()]
        return "\n".join(lines) + "\n"
