"""The dead-letter requeue loop: retry each Pending letter against its task, on the one timer.

Letters come from the watch (``@kopf.on.event``) into a :class:`~.index.LetterIndex`; each one
has at most one entry on the engine's schedule, decided by the pure
:func:`captchatask.deadletters.next_action`:

* ``Pending``: an attempt at ``status.nextAttemptAt`` (a new or redriven letter: now). An
  attempt is :func:`captchatask.deadletters.requeue`: find the task through the engine's task
  index (no API call while there is none), apply the result through the ledger
  (``deliveredBy: deadLetter``; racing pingbacks and polls safely, a second application is
  ``already_done``), and return the letter's next status: ``Requeued``, ``Expired`` (after
  ``max_attempts`` or ``max_age``), or ``Pending`` with the next back-off.
* ``Requeued``: deleted ``requeued_ttl`` after ``requeuedAt``, with uid *and* resourceVersion
  preconditions (a letter a human redrove in the meantime is not deleted).
* ``Expired``: left alone for a human (``captchatask dlq redrive`` puts it back to Pending).

The letter's status is written by compare-and-set on its resourceVersion, so a human's
concurrent redrive always wins: our write is refused, we re-read, and the redriven letter is
attempted afresh. A task that appears (or learns its provider id) wakes the letters waiting
for it at once, instead of after their back-off.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from captchatask import deadletters, kube, model
from captchatask.deadletters import Action, Attempt, LetterView, RequeueOutcome
from captchatask.events import EventType, ObjectRef
from captchatask.model import DeadLetterPhase
from captchatask_operator import policy
from captchatask_operator.actions import Deps, EngineActions
from captchatask_operator.index import LetterIndex
from captchatask_operator.records import TaskRecord
from captchatask_operator.schedule import Kind

if TYPE_CHECKING:
    from captchatask_operator.settings import Settings

logger = logging.getLogger(__name__)

LetterKey = tuple[str, str]

#: Concurrent requeue attempts: a redrive of thousands must not become thousands of GETs at once.
REQUEUE_CONCURRENCY: Final = 8


def backoff_of(settings: Settings) -> deadletters.Backoff:
    """The requeue policy the operator was configured with."""
    return deadletters.Backoff(
        max_attempts=settings.dead_letter_max_attempts,
        max_age=dt.timedelta(seconds=settings.dead_letter_max_age_seconds),
        base=settings.dead_letter_retry_base_seconds,
        cap=settings.dead_letter_retry_max_seconds,
    )


def _is_older(candidate: LetterView, known: LetterView) -> bool:
    """Whether a watch event carries an older version than one we already hold.

    Our own status write returns the new body before the watch delivers the events in between;
    resourceVersions are opaque to clients in general, but the API server's are etcd revisions,
    and comparing them keeps a late event from resurrecting a status we already replaced.
    """
    if candidate.uid != known.uid:
        return False
    try:
        return int(candidate.resource_version) < int(known.resource_version)
    except ValueError:
        return False


class Requeuer:
    """The dead-letter part of the engine."""

    def __init__(self, engine: EngineActions, deps: Deps) -> None:
        self.engine = engine
        self.deps = deps
        self.letters = LetterIndex()
        self.backoff = backoff_of(self.deps.settings)
        self.requeued_ttl = dt.timedelta(
            seconds=self.deps.settings.dead_letter_requeued_ttl_seconds
        )
        self._busy: set[LetterKey] = set()
        self._sem = asyncio.Semaphore(REQUEUE_CONCURRENCY)

    # -- index and schedule (synchronous) ----------------------------------------------------

    def clear(self) -> None:
        """Forget everything (the engine became a standby)."""
        self.letters.clear()
        self._busy.clear()

    def store(self, body: Mapping[str, Any]) -> LetterView | None:
        """Index a listed letter (activation); :meth:`resume` schedules it."""
        letter = LetterView.from_body(body)
        if not self.engine.watched(letter.namespace):
            return None
        self.letters.put(letter)
        return letter

    def resume(self) -> None:
        """Schedule every listed letter; one whose task is already indexed is tried now."""
        for letter in self.letters.values():
            self._plan(letter, try_now_if_task=True)

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Take one watch event of a CaptchaDeadLetter."""
        letter = LetterView.from_body(body)
        if not self.engine.watched(letter.namespace):
            return
        if event_type == "DELETED":
            self.forget(letter.key)
            return
        old = self.letters.get(letter.key)
        if old is not None and _is_older(letter, old):
            return
        if old is not None and old.uid != letter.uid:
            self.forget(letter.key)
        self.letters.put(letter)
        self._plan(letter)

    def forget(self, key: LetterKey) -> None:
        """A letter is gone: drop it and its schedule entries."""
        self.letters.pop(key)
        for kind in (Kind.LETTER, Kind.LETTER_TTL):
            self.engine.unschedule(kind, key)

    def task_seen(self, record: TaskRecord, old: TaskRecord | None) -> None:
        """A task appeared or learned its provider id: wake the letters waiting for it."""
        if record.deleting:
            return
        if old is not None and old.known_provider_task_id == record.known_provider_task_id:
            return
        now = self.deps.clock()
        for key in self.letters.waiting_for(
            record.ref.namespace,
            name=record.ref.name,
            provider_task_id=record.known_provider_task_id,
        ):
            self.engine.schedule_no_later(Kind.LETTER, key, now)

    def _plan(self, letter: LetterView, *, try_now_if_task: bool = False) -> None:
        engine = self.engine
        key = letter.key
        now = self.deps.clock()
        step = deadletters.next_action(letter, now=now, requeued_ttl=self.requeued_ttl)
        if step.action is Action.ATTEMPT:
            engine.unschedule(Kind.LETTER_TTL, key)
            due = step.at or now
            if try_now_if_task and engine.tasks.candidates(
                letter.namespace, name=letter.task_name, provider_task_id=letter.provider_task_id
            ):
                due = min(due, now)
            engine.schedule_at(Kind.LETTER, key, due)
        elif step.action is Action.DELETE:
            assert step.at is not None
            engine.unschedule(Kind.LETTER, key)
            engine.schedule_at(Kind.LETTER_TTL, key, step.at)
        else:
            for kind in (Kind.LETTER, Kind.LETTER_TTL):
                engine.unschedule(kind, key)

    def due(self, kind: Kind, key: LetterKey) -> None:
        """A letter's schedule entry came due (called by the engine's timer)."""
        engine = self.engine
        letter = self.letters.get(key)
        if letter is None:
            return
        if kind is Kind.LETTER_TTL:
            if letter.phase is DeadLetterPhase.REQUEUED:
                engine.spawn(self._delete(letter))
            return
        if letter.phase is not DeadLetterPhase.PENDING:
            return
        if key in self._busy:
            engine.schedule_at(Kind.LETTER, key, self.deps.clock() + policy.BUSY_RETRY)
            return
        self._busy.add(key)
        engine.spawn(self._attempt(key))

    # -- actions --------------------------------------------------------------------------------

    async def _attempt(self, key: LetterKey) -> None:
        try:
            async with self._sem:
                letter = self.letters.get(key)
                if letter is not None and letter.phase is DeadLetterPhase.PENDING:
                    await self._attempt_one(letter)
        finally:
            self._busy.discard(key)

    async def _attempt_one(self, letter: LetterView) -> None:
        engine = self.engine
        try:
            attempt = await deadletters.requeue(
                self.deps.ledger, letter, backoff=self.backoff, lookup=engine.tasks
            )
        except Exception as exc:  # noqa: BLE001 - counted, reported, retried; never stops the loop
            self._failed(letter, exc)
            return
        self.deps.metrics.dead_letter_requeues.labels(letter.namespace, str(attempt.outcome)).inc()
        if attempt.outcome is RequeueOutcome.APPLIED and attempt.task is not None:
            engine.event(
                attempt.task,
                EventType.NORMAL,
                "DeadLetterApplied",
                f"result delivered from dead letter {letter.name} ({letter.reason})",
            )
        try:
            written = await deadletters.write_status(self.deps.client, letter, attempt.status)
        except kube.KubeError as exc:
            # The task side is idempotent: the next attempt finds it done (already_done).
            logger.warning("status of dead letter %s/%s not written: %s", *letter.key, exc)
            engine.schedule_at(Kind.LETTER, letter.key, self.deps.clock() + policy.API_RETRY)
            return
        if written is None:
            try:
                await self._reread(letter)
            except kube.KubeError:
                engine.schedule_at(Kind.LETTER, letter.key, self.deps.clock() + policy.API_RETRY)
            return
        self.letters.put(written)
        self._plan(written)
        self._report(written, attempt)

    def _failed(self, letter: LetterView, exc: Exception) -> None:
        """An attempt raised: count ``error``, say so on the letter, retry without a cost."""
        engine = self.engine
        self.deps.metrics.dead_letter_requeues.labels(
            letter.namespace, str(RequeueOutcome.ERROR)
        ).inc()
        if isinstance(exc, kube.KubeError):
            logger.warning("requeue of dead letter %s/%s postponed: %s", *letter.key, exc)
            delay = policy.API_RETRY
        else:
            logger.error("requeue of dead letter %s/%s failed", *letter.key, exc_info=exc)
            delay = dt.timedelta(
                seconds=deadletters.retry_delay(
                    letter.attempts, base=self.backoff.base, cap=self.backoff.cap
                )
            )
        self._letter_event(
            letter,
            EventType.WARNING,
            "RequeueError",
            f"requeue attempt failed ({type(exc).__name__}); retrying",
        )
        engine.schedule_at(Kind.LETTER, letter.key, self.deps.clock() + delay)

    async def _reread(self, letter: LetterView) -> None:
        """Our status write lost (a human redrove the letter, or it was deleted): re-plan."""
        try:
            body = await self.deps.client.get(kube.DEAD_LETTERS, *letter.key)
        except kube.ApiError as exc:
            if exc.not_found:
                self.forget(letter.key)
                return
            raise
        fresh = LetterView.from_body(body)
        if fresh.uid != letter.uid:
            self.forget(letter.key)
        self.letters.put(fresh)
        self._plan(fresh)

    def _report(self, letter: LetterView, attempt: Attempt) -> None:
        """Events on the letter for what an attempt did (not for every retry: noise)."""
        message = str(attempt.status.get("message", ""))
        if attempt.outcome in (RequeueOutcome.APPLIED, RequeueOutcome.ALREADY_DONE):
            self._letter_event(letter, EventType.NORMAL, "Requeued", message)
        elif attempt.outcome is RequeueOutcome.EXPIRED:
            self._letter_event(letter, EventType.WARNING, "Expired", message)
        elif attempt.outcome is RequeueOutcome.NO_MATCH and letter.attempts == 1:
            next_at = letter.next_attempt_at
            when = f" (next at {model.format_time(next_at)})" if next_at else ""
            self._letter_event(
                letter,
                EventType.NORMAL,
                "RequeueRetry",
                f"no matching task yet; retrying with back-off{when}",
            )

    def _letter_event(self, letter: LetterView, type_: EventType, reason: str, text: str) -> None:
        ref = ObjectRef(model.DEAD_LETTER_KIND, letter.namespace, letter.name, letter.uid)
        self.deps.events.emit(ref, type_, reason, text)

    async def _delete(self, letter: LetterView) -> None:
        """TTL: delete a Requeued letter, only if nobody changed it since we saw it."""
        engine = self.engine
        try:
            await self.deps.client.delete(
                kube.DEAD_LETTERS,
                letter.namespace,
                letter.name,
                uid=letter.uid,
                resource_version=letter.resource_version,
            )
        except kube.ApiError as exc:
            if exc.not_found:
                self.forget(letter.key)
            elif not exc.conflict:  # conflict: changed (redriven); its watch event re-plans
                logger.warning("TTL delete of dead letter %s/%s failed: %s", *letter.key, exc)
        except kube.KubeUnavailable:
            engine.schedule_at(Kind.LETTER_TTL, letter.key, self.deps.clock() + policy.API_RETRY)
        else:
            self.forget(letter.key)
