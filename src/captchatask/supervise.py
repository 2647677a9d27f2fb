"""Supervised background loops: a crash is logged, counted and followed by a restart.

The sidecar's drainer and the operator's timer are coroutines meant to run for the life of the
process. Started with a bare ``create_task``, an unexpected exception ends one silently: the
sidecar stays Ready while acknowledged results pile up in its spool, the operator stops polling
and failing tasks. :class:`Supervisor` runs such a loop, and when it raises (or returns, which a
loop that should run forever must not do), logs the exception, calls ``on_crash`` (a metric) and
restarts it after an exponential back-off, so a transient bug costs a restart and a persistent
one costs CPU at most once per :attr:`Supervisor.max_backoff`.

Health. A loop that crashed :attr:`~Supervisor.unhealthy_after` times in a row is *unhealthy*
(readiness and a gauge say so) until a restart of it has run for
:attr:`~Supervisor.stable_after` seconds without crashing; a run that long also resets the
streak. Health is computed when asked (no extra task), from an injectable monotonic clock.

Cancellation is never a crash: cancelling :meth:`Supervisor.run` cancels the loop and returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

logger = logging.getLogger(__name__)

#: First restart delay: long enough not to spin, short enough that a one-off bug costs nothing.
INITIAL_BACKOFF_SECONDS: Final = 0.1
#: Cap of the restart delay: how late a loop whose fault went away resumes, at worst.
MAX_BACKOFF_SECONDS: Final = 30.0
#: Crashes in a row after which the loop is reported unhealthy.
UNHEALTHY_AFTER: Final = 3
#: A run this long (seconds) proves the loop works again: health back, streak reset.
STABLE_AFTER_SECONDS: Final = 60.0


@dataclass
class Supervisor:
    """Run one background loop forever, restarting it after crashes.

    Parameters
    ----------
    name
        The loop's name (logs, metric label, readiness reason).
    loop
        Makes the coroutine to run (called again for every restart).
    on_crash
        Called once per crash with the exception (``None`` when the loop returned).
    initial_backoff, max_backoff
        Restart delay bounds, seconds (doubling in between).
    unhealthy_after
        Crashes in a row that make the loop unhealthy.
    stable_after
        Seconds of uninterrupted running that make it healthy again.
    clock
        Monotonic seconds (tests inject their own).
    """

    name: str
    loop: Callable[[], Coroutine[Any, Any, None]]
    on_crash: Callable[[BaseException | None], None] = lambda _exc: None
    initial_backoff: float = INITIAL_BACKOFF_SECONDS
    max_backoff: float = MAX_BACKOFF_SECONDS
    unhealthy_after: int = UNHEALTHY_AFTER
    stable_after: float = STABLE_AFTER_SECONDS
    clock: Callable[[], float] = time.monotonic
    #: Crashes since the process started.
    crashes: int = 0
    #: Crashes in a row (reset by a run of :attr:`stable_after` seconds).
    streak: int = 0
    _running_since: float | None = field(default=None, repr=False)

    @property
    def healthy(self) -> bool:
        """Whether the loop is running normally (see the module docstring)."""
        if self.streak < self.unhealthy_after:
            return True
        since = self._running_since
        return since is not None and self.clock() - since >= self.stable_after

    async def run(self) -> None:
        """Run the loop until cancelled; never raises but ``CancelledError``."""
        backoff = self.initial_backoff
        while True:
            started = self._running_since = self.clock()
            error: BaseException | None = None
            try:
                await self.loop()
            except Exception as exc:  # noqa: BLE001 - the point: any bug is logged, counted, survived
                error = exc
            self._running_since = None
            if self.clock() - started >= self.stable_after:
                self.streak = 0
                backoff = self.initial_backoff
            self.crashes += 1
            self.streak += 1
            self.on_crash(error)
            if error is None:
                logger.error("%s ended unexpectedly; restarting in %.1fs", self.name, backoff)
            else:
                logger.error(
                    "%s crashed (%d in a row); restarting in %.1fs",
                    self.name,
                    self.streak,
                    backoff,
                    exc_info=error,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
