"""Write now or divert to the spool: an adaptive bound on the pingback path's ledger writes.

Why: a pingback's sender waits for our ``200``, and a ledger write takes as long as the API server
takes. Below the API server's capacity that is a few milliseconds; above it every write queues
behind the others, and before this module a pingback waited out its whole budget (hundreds of
milliseconds) before falling back to the spool. The spool is just as durable (fsync'd) and costs
about a millisecond, so the pingback path should write to the ledger only while the API server
answers about as fast as it does unloaded, and divert the rest to the spool at once, whose
drainer applies them at the API server's own pace.

:class:`GradientLimit` is that bound, the way latency-based limiters in service meshes work
(Netflix concurrency-limits' Vegas and Gradient): it keeps the **no-load RTT** (the smallest
write time seen over a recent stretch of windows) and the **current RTT** (the mean over the
last window), and moves the limit by their ratio::

    gradient  = clamp(tolerance * noload / current, 0.5, 1.0)
    target    = limit * gradient + sqrt(limit)        # sqrt(limit): room to probe upwards
    limit     = (1 - smoothing) * limit + smoothing * target

so while writes take no longer than ``tolerance`` times their unloaded time the limit grows, and
as the API server's queue builds it shrinks (at most halving per window). A write that times out
or finds the API server unavailable shrinks it at once (:meth:`GradientLimit.drop`). The limit
does not grow while fewer than half of it are in use (it would say nothing about the API server).

:class:`LedgerGate` adds the one rule that makes acknowledgements independent of the API server:
while results wait in the spool or the drainer is replaying them, the API server is already not
keeping up, so a new pingback joins the spool behind them instead of competing with them
(``backlog``). The drainer in turn leaves room for the pingback writes still in flight, so the
hand-over from one to the other does not stretch those writes. With a :class:`~.pace.WritePace`
both paths also share one ceiling on results written per second (``pace``).

Everything here is pure and synchronous: time comes from an injected clock, so the tests drive it
by hand and nothing here sleeps or awaits.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from captchatask_sidecar.pace import WritePace

#: A gradient never cuts the limit by more than half per window (one noisy window is not a trend).
MIN_GRADIENT: Final = 0.5
#: Share of the limit kept after a write timed out or found the API server unavailable.
DROP_FACTOR: Final = 0.5


class Decision(enum.StrEnum):
    """What the pingback path does with one result (``limit``/``backlog`` are diversions)."""

    WRITE = "write"
    LIMIT = "limit"
    BACKLOG = "backlog"
    PACE = "pace"


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """How the limit adapts (defaults: see :mod:`.settings`).

    Attributes
    ----------
    initial, minimum, maximum
        Writes in flight at start, and the bounds the limit stays within.
    tolerance
        How many times the no-load RTT a write may take before the limit shrinks.
    window_seconds
        Samples are averaged over windows this long (and at least ``min_window_samples``).
    min_window_samples
        A window with fewer samples is extended: a mean of two writes is noise.
    noload_windows
        The no-load RTT is the smallest write time of the last this many windows, so it follows
        an API server that became slower (or faster) for good.
    smoothing
        Share of the new target taken per window (the rest is the old limit).
    """

    initial: int = 4
    minimum: int = 1
    maximum: int = 16
    tolerance: float = 2.0
    window_seconds: float = 0.1
    min_window_samples: int = 5
    noload_windows: int = 100
    smoothing: float = 0.2

    def __post_init__(self) -> None:
        """Refuse bounds that cannot hold (a configuration error, caught at startup)."""
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError("need 1 <= minimum <= initial <= maximum")
        if self.tolerance < 1.0:
            raise ValueError("tolerance must be at least 1")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")


class GradientLimit:
    """An adaptive bound on writes in flight, from the ratio of no-load to current RTT.

    Parameters
    ----------
    settings
        How the limit adapts.
    clock
        Monotonic seconds (``time.monotonic`` in production, a fake in tests).
    """

    def __init__(self, settings: LimitSettings, *, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.limit = float(settings.initial)
        self.in_flight = 0
        #: Smallest RTT of the recent windows (``None`` until the first window closed).
        self.noload: float | None = None
        #: Mean RTT of the last closed window.
        self.current: float | None = None
        self._minima: deque[float] = deque(maxlen=settings.noload_windows)
        self._window_start = clock()
        self._samples: list[float] = []
        self._peak = 0

    @property
    def available(self) -> int:
        """Writes that may start now."""
        return max(0, math.floor(self.limit) - self.in_flight)

    def acquire(self) -> bool:
        """Take a slot if the limit allows one; the caller must then :meth:`release` or drop."""
        if self.in_flight >= math.floor(self.limit):
            return False
        self.in_flight += 1
        self._peak = max(self._peak, self.in_flight)
        return True

    def release(self, rtt: float | None) -> None:
        """Give a slot back; ``rtt`` is the write's time, ``None`` when it says nothing of load.

        (A write refused by the API server for its content answers fast for reasons of its own.)
        """
        self.in_flight = max(0, self.in_flight - 1)
        if rtt is not None:
            self._samples.append(rtt)
        self._maybe_close_window()

    def drop(self) -> None:
        """Give a slot back after a timeout or an unavailable API server: shrink at once."""
        self.in_flight = max(0, self.in_flight - 1)
        self.limit = max(float(self.settings.minimum), self.limit * DROP_FACTOR)

    def _maybe_close_window(self) -> None:
        now = self.clock()
        settings = self.settings
        if (
            now - self._window_start < settings.window_seconds
            or len(self._samples) < settings.min_window_samples
        ):
            return
        samples, self._samples = self._samples, []
        peak, self._peak = self._peak, self.in_flight
        self._window_start = now
        self._minima.append(min(samples))
        self.noload = min(self._minima)
        self.current = sum(samples) / len(samples)
        self.limit = next_limit(
            self.limit,
            noload=self.noload,
            current=self.current,
            peak_in_flight=peak,
            settings=settings,
        )


def next_limit(
    limit: float,
    *,
    noload: float,
    current: float,
    peak_in_flight: int,
    settings: LimitSettings,
) -> float:
    """The limit after one window (pure; see the module docstring for the rule)."""
    gradient = 1.0 if current <= 0 else tolerance_ratio(noload, current, settings.tolerance)
    target = limit * gradient + math.sqrt(limit)
    if target > limit and peak_in_flight < limit / 2:
        target = limit  # not using half of it: this window says nothing about more
    smoothed = (1.0 - settings.smoothing) * limit + settings.smoothing * target
    return min(float(settings.maximum), max(float(settings.minimum), smoothed))


def tolerance_ratio(noload: float, current: float, tolerance: float) -> float:
    """``tolerance * noload / current``, kept within [:data:`MIN_GRADIENT`, 1]."""
    return min(1.0, max(MIN_GRADIENT, tolerance * noload / current))


class LedgerGate:
    """The pingback path's decision, shared with the drainer (which reports its replays here).

    Parameters
    ----------
    limit
        The adaptive bound on the pingback path's writes in flight.
    pace
        The ceiling on results written per second, shared with the drainer (``None``: none).
    """

    def __init__(self, limit: GradientLimit, pace: WritePace | None = None) -> None:
        self.limit = limit
        self.pace = pace
        #: Spooled results being replayed right now (the drainer's writes in flight).
        self.replaying = 0
        #: Results wait in the spool for the drainer (set on every append, cleared by the drainer
        #: when it finds nothing due).
        self.backlog = False

    def decide(self) -> Decision:
        """Write now (a slot was taken: release or drop it), or why to divert to the spool."""
        if self.backlog or self.replaying:
            return Decision.BACKLOG
        if self.pace is not None and self.pace.available < 1:
            return Decision.PACE
        if not self.limit.acquire():
            return Decision.LIMIT
        if self.pace is not None:
            self.pace.take()
        return Decision.WRITE

    def replay_started(self) -> None:
        """The drainer sent a spooled result to the API server."""
        self.replaying += 1

    def replay_finished(self) -> None:
        """That replay ended (whatever its outcome)."""
        self.replaying = max(0, self.replaying - 1)
