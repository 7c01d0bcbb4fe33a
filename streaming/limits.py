"""Rate limits the server applies per connection and per client address; transport-free and clock-injected.

- ``TokenBucket``: ``rate`` events a second after a burst of ``burst``. ``take`` refuses when empty (model
  commands); ``charge`` may overdraw, and ``wait_s`` says how long the debt takes to pay back (the message
  budget, which pauses reading instead of dropping).
- ``FailureBackoff``: per client address, a bucket of failures (wrong access tokens); while it is empty the
  address is refused without checking, for ``retry_after`` seconds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take`` spends one if there is one, ``charge`` overdraws."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens, self._last = float(burst), clock()

    @property
    def tokens(self) -> float:
        """Tokens now; negative while in debt."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return self._tokens

    def take(self, cost: float = 1.0) -> bool:
        if self.tokens < cost:
            return False
        self._tokens -= cost
        return True

    def charge(self, cost: float = 1.0) -> float:
        """Spend ``cost`` even if that overdraws; returns the tokens left (negative: debt)."""
        self._tokens = self.tokens - cost
        return self._tokens

    def wait_s(self, need: float = 0.0) -> float:
        """Seconds until the bucket holds ``need`` tokens (0 when it does now)."""
        return max(0.0, (need - self.tokens) / self.rate)

    @property
    def full(self) -> bool:
        return self.tokens >= self.burst


class FailureBackoff:
    """Per address: ``burst`` failures, then one more every ``1/rate`` s; refused while none is left."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = 4096) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, address: str) -> float:
        """Seconds this address must wait before its next attempt is even checked (0: go ahead)."""
        bucket = self._buckets.get(address)
        return 0.0 if bucket is None else bucket.wait_s(1.0)

    def failed(self, address: str) -> None:
        bucket = self._buckets.pop(address, None) or TokenBucket(self.rate, self.burst, self.clock)
        bucket.take()
        self._buckets[address] = bucket  # most recent last
        while len(self._buckets) > self.max_addresses:  # forget the longest-quiet addresses first
            self._buckets.popitem(last=False)
        for stale in [a for a, b in list(self._buckets.items())[:8] if b.full]:
            del self._buckets[stale]
