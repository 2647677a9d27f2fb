"""Admission to a provider: at most ``maxInFlight`` tasks Submitted at once, oldest first.

A :class:`ProviderQueue` per provider holds the tasks waiting to be submitted, ordered by
``creationTimestamp`` (then name, for a total order), and the set of tasks that occupy a slot:
those ``Submitted`` plus those whose submission is in progress (a reserved slot, so two
admissions cannot both take the last one). Pure and synchronous: the engine calls
:meth:`ProviderQueue.admit` whenever a slot may have freed or a task arrived.
"""

from __future__ import annotations

import datetime as dt
import heapq

TaskKey = tuple[str, str]


class ProviderQueue:
    """Waiting tasks (oldest first) and occupied slots of one provider."""

    def __init__(self) -> None:
        self._heap: list[tuple[dt.datetime, str, str]] = []
        self._waiting: dict[TaskKey, dt.datetime] = {}
        self.in_flight: set[TaskKey] = set()

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, key: object) -> bool:
        return key in self._waiting

    def wait(self, key: TaskKey, created_at: dt.datetime) -> None:
        """Add a task to the waiting line (idempotent)."""
        if key in self._waiting or key in self.in_flight:
            return
        self._waiting[key] = created_at
        heapq.heappush(self._heap, (created_at, key[0], key[1]))

    def discard(self, key: TaskKey) -> None:
        """Remove a task from the line and free its slot (it ended, or was deleted)."""
        self._waiting.pop(key, None)
        self.in_flight.discard(key)

    def occupy(self, key: TaskKey) -> None:
        """Mark a task as holding a slot (it is Submitted, or being submitted)."""
        self._waiting.pop(key, None)
        self.in_flight.add(key)

    def free_slots(self, max_in_flight: int | None) -> int | None:
        """Slots left, or ``None`` for no limit."""
        if max_in_flight is None:
            return None
        return max(0, max_in_flight - len(self.in_flight))

    def admit(self, max_in_flight: int | None, *, limit: int | None = None) -> list[TaskKey]:
        """Take the oldest waiting tasks that fit, reserving a slot for each.

        Parameters
        ----------
        max_in_flight
            The provider's cap (``None``: unlimited).
        limit
            Take at most this many now (the caller's submission concurrency).
        """
        room = self.free_slots(max_in_flight)
        budgets = [n for n in (room, limit) if n is not None]
        budget = min(budgets) if budgets else len(self._waiting)
        taken: list[TaskKey] = []
        while self._heap and len(taken) < budget:
            created, namespace, name = heapq.heappop(self._heap)
            key = (namespace, name)
            if self._waiting.get(key) != created:
                continue  # stale: removed or re-added with another timestamp
            self.occupy(key)
            taken.append(key)
        return taken

    def waiting_keys(self) -> list[TaskKey]:
        """The waiting tasks, oldest first (for tests and status)."""
        return [key for key, _ in sorted(self._waiting.items(), key=lambda kv: (kv[1], kv[0]))]
