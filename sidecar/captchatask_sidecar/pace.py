"""A ceiling on results written to the ledger per second: the receiver's share of the API server.

Why: API Priority and Fairness shares out the API server's *seats* (requests in flight), not its
CPU. A level with only three seats still keeps a one-core API server busy, because each write
ends in a few milliseconds and the next takes its seat, so an unrelated client's requests wait for
the CPU however few seats we hold. The measured remedy is fewer writes per second, which is what
``client-go``'s QPS/burst settings give Kubernetes' own components and what this module gives the
receiver: a token bucket of ``rate`` results per second with room for ``burst`` at once.

It only decides *when* a result is written, never *whether*: a pingback that finds the bucket
empty is acknowledged from the fsync'd spool like any other diversion (``reason="pace"``) and the
drainer writes it when a token is free, so the cost of a pace is ledger latency during a storm,
never a lost or slower acknowledgement. ``rate`` 0 (the default) turns it off.

Pure and synchronous like :mod:`.limiter`: time comes from an injected clock.
"""

from __future__ import annotations

from collections.abc import Callable


class WritePace:
    """A token bucket: at most ``burst`` results at once, refilled at ``rate`` per second.

    Parameters
    ----------
    rate
        Results per second, above 0.
    burst
        Tokens the bucket holds (and starts with), at least 1.
    clock
        Monotonic seconds (``time.monotonic`` in production, a fake in tests).
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float]) -> None:
        if rate <= 0:
            raise ValueError("rate must be above 0 (leave the pace out to turn it off)")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> float:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens

    @property
    def available(self) -> int:
        """Whole tokens available now (results that may be written at once)."""
        return int(self._refill())

    def take(self) -> bool:
        """Take one token if there is one."""
        if self._refill() < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def seconds_until_next(self) -> float:
        """How long until one token is available (0 if one is now)."""
        missing = 1.0 - self._refill()
        return max(0.0, missing / self.rate)
