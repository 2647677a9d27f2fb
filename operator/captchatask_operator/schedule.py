"""The operator's one timer: a heap of due times keyed by (what, which object).

Every time-based action of the operator (the first fallback poll of a task, its next polls, its
deadline, its TTL deletion, a submission back-off, a provider re-check, a dead letter's next
requeue attempt and its deletion after the requeued TTL) is an entry in one
:class:`Schedule`, driven by one asyncio task (``engine.Engine._timer_loop``). That is what makes
"exactly at ``submittedAt + callbackTimeoutSeconds``" cheap at 10,000 tasks: no per-object
timers, no periodic sweep, one ``heappush`` per reschedule and one wake-up per due moment.

Each key has at most one live entry: rescheduling pushes a new heap item and marks the old one
stale (lazy deletion); stale items are skipped when they surface and the heap is compacted
when they outnumber the live ones. Pure: due times are plain floats (POSIX seconds) and the
caller supplies "now", so tests drive it with a fake clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable
from enum import StrEnum
from typing import Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: Compact the heap when stale items exceed live ones by this factor (plus a small floor).
_COMPACT_FACTOR: Final = 2
_COMPACT_FLOOR: Final = 64


class Kind(StrEnum):
    """What a schedule entry does when it comes due."""

    POLL = "poll"
    DEADLINE = "deadline"
    TTL = "ttl"
    SUBMIT = "submit"
    PROVIDER = "provider"
    LETTER = "letter"
    LETTER_TTL = "letter-ttl"


class Schedule(Generic[K]):
    """A min-heap of due times with one live entry per key."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, tuple[float, int]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def due_of(self, key: K) -> float | None:
        """When ``key`` is due, or ``None`` if it is not scheduled."""
        entry = self._live.get(key)
        return entry[0] if entry else None

    def set(self, key: K, due: float) -> bool:
        """Schedule (or reschedule) ``key``; return whether it is now the earliest entry.

        The caller wakes the timer loop only when this returns ``True``.
        """
        current = self._live.get(key)
        if current is not None and current[0] == due:
            return False
        seq = next(self._seq)
        self._live[key] = (due, seq)
        heapq.heappush(self._heap, (due, seq, key))
        self._maybe_compact()
        head = self.next_due()
        return head is not None and head >= due

    def set_earlier(self, key: K, due: float) -> bool:
        """Like :meth:`set`, but never postpones an existing earlier entry."""
        current = self.due_of(key)
        if current is not None and current <= due:
            return False
        return self.set(key, due)

    def cancel(self, key: K) -> None:
        """Forget ``key`` (its heap item becomes stale)."""
        self._live.pop(key, None)

    def next_due(self) -> float | None:
        """The earliest live due time, or ``None`` when nothing is scheduled."""
        while self._heap:
            due, seq, key = self._heap[0]
            live = self._live.get(key)
            if live is not None and live[1] == seq:
                return due
            heapq.heappop(self._heap)
        return None

    def pop_due(self, now: float) -> list[K]:
        """Remove and return every key due at or before ``now``, earliest first."""
        return [key for key, _due in self.pop_due_timed(now)]

    def pop_due_timed(self, now: float) -> list[tuple[K, float]]:
        """Like :meth:`pop_due`, with each key's due time (poll batching bounds lateness)."""
        out: list[tuple[K, float]] = []
        while self._heap:
            due, seq, key = self._heap[0]
            live = self._live.get(key)
            if live is None or live[1] != seq:
                heapq.heappop(self._heap)
                continue
            if due > now:
                break
            heapq.heappop(self._heap)
            del self._live[key]
            out.append((key, due))
        return out

    def take_due(
        self, horizon: float, *, accept: Callable[[K], bool], limit: int
    ) -> list[tuple[K, float]]:
        """Remove and return up to ``limit`` accepted keys due at or before ``horizon``.

        Earliest first, like :meth:`pop_due_timed`, but only the keys ``accept`` chooses, and
        the horizon may lie in the future: a poll batch that goes out now takes its provider's
        polls due within the batching window (see :meth:`.polling.Poller.flush`). Walks only
        the part of the heap due by ``horizon`` (a heap's subtree below a later item is later
        still), so the cost grows with what is due soon, not with the whole schedule.
        """
        if limit <= 0:
            return []
        found: list[tuple[float, int, K]] = []
        stack = [0] if self._heap else []
        while stack:
            index = stack.pop()
            due, seq, key = self._heap[index]
            if due > horizon:
                continue
            live = self._live.get(key)
            if live is not None and live[1] == seq and accept(key):
                found.append((due, seq, key))
            stack.extend(c for c in (2 * index + 1, 2 * index + 2) if c < len(self._heap))
        found.sort()
        taken = found[:limit]
        for _due, _seq, key in taken:
            del self._live[key]  # its heap item is now stale (lazy deletion)
        return [(key, due) for due, _seq, key in taken]

    def clear(self) -> None:
        """Forget everything (the operator became a standby)."""
        self._heap.clear()
        self._live.clear()

    @property
    def heap_size(self) -> int:
        """Items in the heap including stale ones (for the scaling measurement)."""
        return len(self._heap)

    def _maybe_compact(self) -> None:
        if len(self._heap) > _COMPACT_FACTOR * len(self._live) + _COMPACT_FLOOR:
            self._heap = [(due, seq, key) for key, (due, seq) in self._live.items()]
            heapq.heapify(self._heap)
