"""The operator's one timer: *when* each timed action runs, apart from *what* it does.

Every timed action of the engine (polls, deadlines, TTLs, submission back-offs, provider
re-checks, dead-letter attempts and deletions) is one entry of one
:class:`~.schedule.Schedule`, keyed by ``(kind, namespace, name)``. :meth:`Timer.run` sleeps until
the earliest entry is due (or until a poll batch must go), then hands everything due to the
engine's dispatch in one call. Thousands of tasks cost one sleeping coroutine, not one each.

Moving an entry earlier than the current head wakes the loop; moving one later does not (the
loop finds out when it wakes anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable, Iterable

from captchatask_operator.schedule import Kind, Schedule

EntryKey = tuple[Kind, str, str]
#: Receives the entries that came due, with their due times (epoch seconds).
Dispatch = Callable[[Iterable[tuple[EntryKey, float]]], None]
#: Sends the poll batches that must go at ``now``; returns when the next one must, if any.
Flush = Callable[[float], float | None]


class Timer:
    """The schedule of timed actions and the loop that dispatches what is due.

    Parameters
    ----------
    clock
        Source of "now" (UTC).
    dispatch
        Called with the entries that came due.
    flush
        Called on every wake-up; its answer bounds the next sleep.
    """

    def __init__(
        self, *, clock: Callable[[], dt.datetime], dispatch: Dispatch, flush: Flush
    ) -> None:
        self.schedule: Schedule[EntryKey] = Schedule()
        self._clock = clock
        self._dispatch = dispatch
        self._flush = flush
        self._wake = asyncio.Event()

    def at(self, kind: Kind, key: tuple[str, str], due: dt.datetime) -> None:
        """Put (or move) one timed action on the schedule; wake the loop if it is earliest."""
        entry: EntryKey = (kind, *key)
        if self.schedule.set(entry, due.timestamp()):
            self._wake.set()

    def no_later(self, kind: Kind, key: tuple[str, str], due: dt.datetime) -> None:
        """Like :meth:`at`, but never postpones an entry that is due earlier."""
        entry: EntryKey = (kind, *key)
        if self.schedule.set_earlier(entry, due.timestamp()):
            self._wake.set()

    def cancel(self, kind: Kind, key: tuple[str, str]) -> None:
        """Drop one timed action (if it is there)."""
        self.schedule.cancel((kind, *key))

    def wake_if_earliest(self, entry: EntryKey) -> None:
        """Wake the loop if ``entry`` (set directly on :attr:`schedule`) is now the head."""
        due = self.schedule.due_of(entry)
        head = self.schedule.next_due()
        if due is not None and head is not None and due <= head:
            self._wake.set()

    def clear(self) -> None:
        """Forget every entry (the engine became a standby)."""
        self.schedule.clear()

    async def run(self) -> None:
        """Sleep until the earliest entry (or poll batch), dispatch what is due; forever.

        Due polls are not sent at once: they gather per provider in :class:`.polling.Poller`
        batches (one bulk request) until a batch is full or its oldest poll is late by
        ``--poll-batch-window``; ``flush`` says when that is, and the loop wakes for it too.
        """
        while True:
            self._wake.clear()
            now = self._clock().timestamp()
            due = self.schedule.pop_due_timed(now)
            if due:
                self._dispatch(due)
            flush_at = self._flush(now)
            head = self.schedule.next_due()
            wake_at = min((t for t in (head, flush_at) if t is not None), default=None)
            if wake_at is not None and wake_at <= now:
                await asyncio.sleep(0)
                continue
            timeout = None if wake_at is None else wake_at - now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
