"""The engine's in-memory indexes of tasks and dead letters, each with a provider-id lookup.

The operator watches every CaptchaTask and CaptchaDeadLetter it serves, so it already holds what
matching a dead letter to a task needs: a letter names a task (``spec.taskRef.name``) and/or a
provider task id, and a task knows its provider task id (status, or spec for an adopted task).
Keeping both directions indexed here means that

* a requeue attempt for a letter whose task does not exist costs **no API call** (the
  :class:`TaskIndex` implements :class:`captchatask.deadletters.TaskLookup`), and
* a task that appears (or learns its provider id) wakes exactly the letters waiting for it
  (:meth:`LetterIndex.waiting_for`), instead of their next back-off expiring minutes later.

The indexes only name *candidates*; the requeue path re-reads the task and checks the match on
the fresh body, so a stale entry costs a retry, never a wrong match. Pure: no I/O, no kopf.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from typing import Generic, TypeVar

from captchatask.deadletters import LetterView
from captchatask.model import DeadLetterPhase, Phase
from captchatask_operator.records import TaskRecord

Key = tuple[str, str]
V = TypeVar("V")


class _Multimap(Generic[V]):
    """``(namespace, value) -> {names}``, kept in step with a ``key -> value`` map."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, V], set[str]] = {}
        self._value_of: dict[Key, V] = {}

    def set(self, key: Key, value: V | None) -> None:
        self.discard(key)
        if value is None:
            return
        self._value_of[key] = value
        self._names.setdefault((key[0], value), set()).add(key[1])

    def discard(self, key: Key) -> None:
        old = self._value_of.pop(key, None)
        if old is None:
            return
        names = self._names.get((key[0], old))
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._names[(key[0], old)]

    def names(self, namespace: str, value: V) -> list[str]:
        return sorted(self._names.get((namespace, value), ()))

    def clear(self) -> None:
        self._names.clear()
        self._value_of.clear()


class TaskIndex:
    """Every served task as a slim :class:`TaskRecord`, by key and by provider task id."""

    def __init__(self) -> None:
        self._records: dict[Key, TaskRecord] = {}
        self._by_pid: _Multimap[str] = _Multimap()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __iter__(self) -> Iterator[Key]:
        return iter(self._records)

    def get(self, key: Key) -> TaskRecord | None:
        """The task's record, or ``None``."""
        return self._records.get(key)

    def values(self) -> list[TaskRecord]:
        """A snapshot of every record (safe to iterate while the index changes)."""
        return list(self._records.values())

    def counts(self) -> dict[tuple[str, str, str], int]:
        """(namespace, provider, phase) -> count, for the ``captchatask_tasks`` gauge."""
        counts: Counter[tuple[str, str, str]] = Counter()
        for task in self._records.values():
            counts[(*task.provider_key, str(task.phase or Phase.PENDING))] += 1
        return dict(counts)

    def past_deadline_counts(self, now: dt.datetime) -> dict[tuple[str, str], int]:
        """Count unfinished tasks past their deadline at ``now`` per provider (the alert's gauge).

        A healthy active operator fails such a task with ``DeadlineExceeded`` within moments,
        so a count that stays above 0 means its scheduler is stuck or it cannot write.
        """
        counts: Counter[tuple[str, str]] = Counter()
        for task in self._records.values():
            if not task.terminal and task.deadline <= now:
                counts[task.provider_key] += 1
        return dict(counts)

    def put(self, record: TaskRecord) -> TaskRecord | None:
        """Store the freshest record of a task; return the previous one."""
        old = self._records.get(record.key)
        self._records[record.key] = record
        if old is None or old.known_provider_task_id != record.known_provider_task_id:
            self._by_pid.set(record.key, record.known_provider_task_id)
        return old

    def pop(self, key: Key) -> TaskRecord | None:
        """Forget a task; return its record."""
        self._by_pid.discard(key)
        return self._records.pop(key, None)

    def clear(self) -> None:
        """Forget everything (the operator became a standby)."""
        self._records.clear()
        self._by_pid.clear()

    def candidates(
        self, namespace: str, *, name: str | None, provider_task_id: str | None
    ) -> list[str]:
        """Tasks a dead letter may belong to: the named one first, then the id's owners."""
        out: list[str] = []
        if name and (namespace, name) in self._records:
            out.append(name)
        if provider_task_id:
            out.extend(n for n in self._by_pid.names(namespace, provider_task_id) if n not in out)
        return out


class LetterIndex:
    """Every served dead letter, by key, by the task it names and by provider task id."""

    def __init__(self) -> None:
        self._letters: dict[Key, LetterView] = {}
        self._by_pid: _Multimap[str] = _Multimap()
        self._by_task: _Multimap[str] = _Multimap()

    def __len__(self) -> int:
        return len(self._letters)

    def __contains__(self, key: object) -> bool:
        return key in self._letters

    def get(self, key: Key) -> LetterView | None:
        """The letter as last seen, or ``None``."""
        return self._letters.get(key)

    def values(self) -> list[LetterView]:
        """A snapshot of every letter."""
        return list(self._letters.values())

    def put(self, letter: LetterView) -> LetterView | None:
        """Store the freshest view of a letter; return the previous one."""
        old = self._letters.get(letter.key)
        self._letters[letter.key] = letter
        if old is None:  # spec is immutable in practice: index once
            self._by_pid.set(letter.key, letter.provider_task_id)
            self._by_task.set(letter.key, letter.task_name)
        return old

    def pop(self, key: Key) -> LetterView | None:
        """Forget a letter; return it."""
        self._by_pid.discard(key)
        self._by_task.discard(key)
        return self._letters.pop(key, None)

    def clear(self) -> None:
        """Forget everything (the operator became a standby)."""
        self._letters.clear()
        self._by_pid.clear()
        self._by_task.clear()

    def waiting_for(self, namespace: str, *, name: str, provider_task_id: str | None) -> list[Key]:
        """Pending letters that name this task or its provider task id."""
        names = set(self._by_task.names(namespace, name))
        if provider_task_id:
            names.update(self._by_pid.names(namespace, provider_task_id))
        keys = [(namespace, n) for n in sorted(names)]
        return [
            key
            for key in keys
            if (letter := self._letters.get(key)) is not None
            and letter.phase is DeadLetterPhase.PENDING
        ]

    def counts(self) -> Counter[tuple[str, str, str]]:
        """(namespace, reason, phase) -> letters, for the ``captchatask_dead_letters`` gauge."""
        return Counter(
            (letter.namespace, letter.reason, str(letter.phase))
            for letter in self._letters.values()
        )
