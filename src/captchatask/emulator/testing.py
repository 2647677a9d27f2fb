"""Test doubles for time, shared by the provider, emulator, chaos and benchmark tests.

Tests must not assert on wall-clock time and must not wait for documented waits of minutes.
:class:`ManualClock` is a monotonic clock for :class:`~captchatask.emulator.state.EmulatorState`
(retention, report windows, rate-limit windows) that only moves when told. :class:`RecordingSleep`
is an awaitable sleep for :class:`~captchatask.provider.client.ProviderClient` that records every
requested wait and, instead of sleeping, moves a manual clock and/or waits for a condition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

__all__ = ["ManualClock", "RecordingSleep"]

_CONDITION_POLL_SECONDS: Final = 0.002
_CONDITION_LIMIT_SECONDS: Final = 10.0


class ManualClock:
    """A monotonic clock that advances only through :meth:`advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.value = start

    def __call__(self) -> float:
        """Return the current reading."""
        return self.value

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.value += seconds


class RecordingSleep:
    """An awaitable ``sleep(seconds)`` that records the waits a client asks for.

    Parameters
    ----------
    clock
        When given, each sleep advances it by the requested seconds.
    until
        When given, each sleep returns only once this condition holds (polled on the event
        loop, so the emulator keeps serving meanwhile); bounded so a broken test cannot hang.
    """

    def __init__(
        self, *, clock: ManualClock | None = None, until: Callable[[], bool] | None = None
    ) -> None:
        self.waits: list[float] = []
        self._clock = clock
        self._until = until

    async def __call__(self, seconds: float) -> None:
        """Record ``seconds``, then advance the clock and/or wait for the condition."""
        self.waits.append(seconds)
        if self._clock is not None:
            self._clock.advance(seconds)
        if self._until is not None:
            async with asyncio.timeout(_CONDITION_LIMIT_SECONDS):
                while not self._until():  # noqa: ASYNC110 - the condition is plain state, no event
                    await asyncio.sleep(_CONDITION_POLL_SECONDS)
        else:
            await asyncio.sleep(0)
