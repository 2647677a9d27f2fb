"""Fallback polling: the tasks of one provider that fall due together, in one request.

The engine's timer hands every due poll to :meth:`Poller.collect`; a provider's polls gather in
one batch until the batch holds ``bulk_max_ids`` ids or its *oldest* poll is late by
``--poll-batch-window`` (:meth:`Poller.flush`), then go out through :meth:`Poller.poll_batch`
in one ``get_results`` call (bulk ``ids=`` where the dialect supports it). A batch that goes
out also carries the provider's polls due within the next window (polled early rather than in
a request of their own), as many as fit the request's free ids: an id in a request that is
sent anyway costs nothing, and early costs the recovery budget nothing, where late would (an
early poll that finds no answer is polled again when it was due, not an interval later).
Adaptive: at a high rate a batch fills at once; at a low rate a poll waits at most the window
and goes at most the window early. Providers without bulk polling (one request per id
anyway) are neither held back nor pulled forward. ``captchatask_poll_batch_size`` counts the
ids of every ``res.php`` poll request.

Each answer is applied through the ledger like any other result: a found answer becomes
``Solved`` with ``deliveredBy: poll`` (a *fallback recovery*), a permanent code fails the task,
a result the provider no longer holds fails it with ``ResultExpired``, and ``CAPCHA_NOT_READY``
plans the next poll (:func:`policy.after_poll`, never beyond ``maxPolls``).

A final answer (a solution or a permanent code) that the API server does not take is *held*
(:attr:`Poller.held`) and written again with back-off until the ledger takes it (and at once
when the engine's API-server probe sees the API server answer again), instead of
being dropped and fetched again: during an outage the solver would otherwise be asked once per
due task every retry, for an answer the operator already had. A held answer carries the time it
arrived, so one that came before the task's deadline still replaces the ``DeadlineExceeded``
the operator may write meanwhile (:func:`captchatask.decision.decide`), and its task is not
polled again while it is held. An operator restart forgets held answers; the task's next
fallback poll fetches the answer again.

An answer whose task vanished (or was recreated) while the request was in flight is authentic
and paid for: it becomes a dead letter through :meth:`Ledger.dead_letter`, exactly as a
pingback would, so the requeue loop can still deliver it (e.g. to an adopted task that owns the
same provider task id), never a silent drop. No later poll would fetch that answer again (its
task is gone), so while the letter cannot be written the poller holds it in memory
(:attr:`Poller.unwritten`, counted in ``captchatask_dead_letters_unwritten``) and retries with
back-off until the API server takes it, for as long as it takes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from captchatask import kube, model
from captchatask.decision import Outcome, Result
from captchatask.events import EventType
from captchatask.ledger import Recorded
from captchatask.model import DeadLetterReason, DeliveredBy, Phase
from captchatask.provider.client import PollResult
from captchatask.provider.codes import Verdict
from captchatask.provider.errors import ProviderError
from captchatask.provider.replies import Solution
from captchatask_operator import policy
from captchatask_operator.actions import Deps, EngineActions, ProviderState
from captchatask_operator.metrics import failure_label
from captchatask_operator.policy import FailureCode, PollOutcome
from captchatask_operator.records import TaskRecord
from captchatask_operator.schedule import Kind

logger = logging.getLogger(__name__)

TaskKey = tuple[str, str]
ProviderKey = tuple[str, str]

#: Concurrent ledger writes for the results of one poll batch.
RECORD_CONCURRENCY: Final = 16
#: ``spec.payload.source`` of a dead letter written for a poll result (a CRD enum value).
POLL_SOURCE: Final = "poll"
#: Back-off of an unwritten dead letter: first step and cap (seconds). The cap keeps a letter
#: held through a long outage within a minute of the API server's return.
LETTER_RETRY_FIRST_SECONDS: Final = 1.0
LETTER_RETRY_MAX_SECONDS: Final = 60.0
#: Back-off of a held poll answer: first step and cap (seconds). A small cap: the answer should
#: reach the ledger within seconds of the API server's return.
HELD_RETRY_FIRST_SECONDS: Final = 1.0
HELD_RETRY_MAX_SECONDS: Final = 4.0
#: Poll outcomes that are the task's answer (held when the ledger cannot take them).
FINAL_OUTCOMES: Final = frozenset({PollOutcome.SOLVED, PollOutcome.FAILED})

LetterKey = tuple[str, str, str, str]


@dataclass(slots=True)
class UnwrittenLetter:
    """A poll result whose task is gone, held until its dead letter is written."""

    task: TaskRecord
    result: Result
    reason: DeadLetterReason
    message: str
    received_at: dt.datetime


@dataclass(frozen=True, slots=True)
class HeldAnswer:
    """A final poll answer the ledger did not take yet, and when the solver gave it."""

    result: PollResult
    received_at: dt.datetime


def request_sizes(ids: int, *, bulk: bool, max_ids: int) -> list[int]:
    """Ids per ``res.php`` request when polling ``ids`` tasks (what ``get_results`` sends)."""
    if not bulk:
        return [1] * ids
    full, rest = divmod(ids, max_ids)
    return [max_ids] * full + ([rest] if rest else [])


def free_ids(ids: int, *, max_ids: int) -> int:
    """Ids that still fit the bulk requests ``ids`` polls need (never an extra request)."""
    return -ids % max_ids


def _minimal_view(task: TaskRecord, phase: Phase) -> model.TaskView:
    """A view carrying just what a phase-pinned status write needs (no GET)."""
    return model.TaskView.from_body(
        {
            "metadata": {
                "namespace": task.ref.namespace,
                "name": task.ref.name,
                "uid": task.ref.uid,
                "resourceVersion": task.resource_version,
            },
            "status": {"phase": str(phase)},
        }
    )


@dataclass(slots=True)
class PollBatch:
    """Polls of one provider waiting to go out together."""

    oldest: float
    keys: dict[TaskKey, None] = field(default_factory=dict)


class Poller:
    """The fallback-polling part of the engine."""

    def __init__(self, engine: EngineActions, deps: Deps) -> None:
        self.engine = engine
        self.deps = deps
        self._poll_sem = asyncio.Semaphore(deps.settings.poll_concurrency)
        self._record_sem = asyncio.Semaphore(RECORD_CONCURRENCY)
        self.dead_letters = 0
        self.batches: dict[ProviderKey, PollBatch] = {}
        #: Polls sent per submitted task since its last status checkpoint (see policy.after_poll).
        self.polls: dict[TaskKey, int] = {}
        #: Poll results whose dead letter could not be written yet (kept across a standby spell;
        #: :meth:`resume_unwritten` restarts their retries when the engine is active again).
        self.unwritten: dict[LetterKey, UnwrittenLetter] = {}
        #: First step and cap of their back-off (seconds).
        self.letter_retry = (LETTER_RETRY_FIRST_SECONDS, LETTER_RETRY_MAX_SECONDS)
        #: Final answers the ledger did not take yet, by task: written again with back-off
        #: (:meth:`_keep_applying`), and their tasks are not polled meanwhile.
        self.held: dict[TaskKey, HeldAnswer] = {}
        #: First step and cap of that back-off (seconds).
        self.held_retry = (HELD_RETRY_FIRST_SECONDS, HELD_RETRY_MAX_SECONDS)

    def collect(self, provider_key: ProviderKey, key: TaskKey, *, due: float) -> None:
        """Add a poll that came due (at ``due``, epoch seconds) to its provider's batch."""
        batch = self.batches.get(provider_key)
        if batch is None:
            self.batches[provider_key] = PollBatch(due, {key: None})
            return
        batch.oldest = min(batch.oldest, due)
        batch.keys[key] = None

    def flush(self, now: float) -> float | None:
        """Send every batch that is full or whose oldest poll is late by the window.

        Returns when the next pending batch must go at the latest (for the engine's timer).
        """
        engine = self.engine
        window = self.deps.settings.poll_batch_window
        next_flush: float | None = None
        for provider_key, batch in list(self.batches.items()):
            state = engine.providers.get(provider_key)
            client = state.client if state is not None else None
            # No client yet (unchecked) or no bulk: nothing to gain by waiting.
            if client is None or not client.bulk_results:
                del self.batches[provider_key]
                engine.spawn(self.poll_batch(provider_key, list(batch.keys)))
                continue
            full = len(batch.keys) >= client.bulk_max_ids
            deadline = batch.oldest + window
            if full or now >= deadline:
                del self.batches[provider_key]
                keys = list(batch.keys)
                room = free_ids(len(keys), max_ids=client.bulk_max_ids)
                early = dict(engine.take_polls(provider_key, by=now + window, limit=room))
                keys += early
                engine.spawn(self.poll_batch(provider_key, keys, early=early))
            elif next_flush is None or deadline < next_flush:
                next_flush = deadline
        return next_flush

    async def poll_batch(
        self,
        provider_key: ProviderKey,
        keys: list[TaskKey],
        *,
        early: Mapping[TaskKey, float] | None = None,
    ) -> None:
        """Poll the tasks of one provider that came due together (one bulk request).

        ``early`` maps the polls carried before their due time to that time (epoch seconds):
        one that finds no answer is polled again when it was due, not an interval later.
        """
        early = early or {}
        engine = self.engine
        async with self._poll_sem:
            state = engine.providers.get(provider_key)
            now = self.deps.clock()
            if (
                state is None
                or state.client is None
                or policy.polls_stopped(ready=state.ready, reason=state.reason)
            ):
                # Results can still be fetched while the provider is "not Ready" for lack of
                # threads or balance, or while its check fails transiently (a restarted
                # operator does not wait for one to pass); only a missing client (no usable key
                # yet) or a key the provider rejected stops polling, until a check passes.
                unchecked = state is not None and not state.checked
                later = now + (
                    policy.UNCHECKED_RETRY
                    if unchecked
                    else dt.timedelta(seconds=self.deps.settings.provider_retry_seconds)
                )
                for key in keys:
                    if key in engine.tasks:
                        engine.schedule_at(Kind.POLL, key, later)
                return
            by_id: dict[str, TaskRecord] = {}
            for key in keys:
                task = engine.tasks.get(key)
                if task is None or task.terminal:
                    continue
                if key in engine.busy:
                    engine.schedule_at(Kind.POLL, key, now + policy.BUSY_RETRY)
                    continue
                if key in self.held:
                    continue  # its answer is here already, on its way to the ledger
                provider_task_id = task.known_provider_task_id
                if provider_task_id is None:
                    continue
                by_id[provider_task_id] = task
            if not by_id:
                return
            engine.counters.poll_requests += 1
            batch_size = self.deps.metrics.poll_batch_size.labels(*state.spec.key)
            for size in request_sizes(
                len(by_id), bulk=state.client.bulk_results, max_ids=state.client.bulk_max_ids
            ):
                batch_size.observe(size)
            try:
                results = await state.client.get_results(list(by_id))
            except ProviderError as exc:
                self._request_failed(state, by_id.values(), exc)
                return
            await asyncio.gather(
                *(
                    self._after_poll(state, by_id[pid], result, was_due=early.get(by_id[pid].key))
                    for pid, result in results.items()
                    if pid in by_id
                )
            )

    def _request_failed(
        self, state: ProviderState, tasks: Iterable[TaskRecord], exc: ProviderError
    ) -> None:
        engine = self.engine
        classification = exc.classification
        if classification.effective_verdict is Verdict.CONFIG_ERROR:
            engine.provider_not_ready(
                state, policy.provider_verdict(state.spec.dialect, error=classification)
            )
            wait = self.deps.settings.provider_retry_seconds
        else:
            wait = max(
                classification.wait_seconds or policy.DEFAULT_ERROR_WAIT_SECONDS,
                self.deps.settings.poll_batch_window,
            )
        later = self.deps.clock() + dt.timedelta(seconds=wait)
        for task in tasks:
            self.deps.metrics.fallback_polls.labels(*state.spec.key, str(PollOutcome.ERROR)).inc()
            engine.schedule_at(Kind.POLL, task.key, later)

    async def _after_poll(
        self, state: ProviderState, task: TaskRecord, result: PollResult, *, was_due: float | None
    ) -> None:
        """Apply one task's poll result; on an API failure hold a final answer, else poll again."""
        received_at = self.deps.clock()
        try:
            await self.apply(state, task, result, was_due=was_due)
        except Exception as exc:  # noqa: BLE001 - one task's failure must not stop its batch
            if isinstance(exc, kube.KubeUnavailable):
                self.engine.note_ledger_unavailable()
            if policy.classify_poll(result) not in FINAL_OUTCOMES:
                logger.warning("poll result of %s/%s not applied: %r", *task.key, exc)
                self.engine.schedule_at(Kind.POLL, task.key, received_at + policy.API_RETRY)
                return
            logger.warning(
                "poll answer of %s/%s held until the ledger takes it: %r", *task.key, exc
            )
            self.held[task.key] = HeldAnswer(result=result, received_at=received_at)
            self.engine.spawn(self._keep_applying(state, task))

    async def _keep_applying(self, state: ProviderState, task: TaskRecord) -> None:
        """Write one held answer with capped exponential back-off until the ledger takes it.

        The ledger decides what it becomes by then (the task may have been solved by a pingback,
        failed by its deadline, or deleted: a dead letter); the solver is not asked again.
        """
        first, cap = self.held_retry
        delay = first
        while (held := self.held.get(task.key)) is not None:
            woken = await self.engine.ledger_back(delay)
            try:
                await self.apply(state, task, held.result, held=held)
            except Exception as exc:  # noqa: BLE001 - retried until the API server takes it
                if isinstance(exc, kube.KubeUnavailable):
                    self.engine.note_ledger_unavailable()
                logger.debug("held poll answer of %s/%s not applied yet: %r", *task.key, exc)
                # Woken as the API server returned: it may not take writes for a moment yet.
                delay = first if woken else min(cap, delay * 2)
                continue
            self.held.pop(task.key, None)

    async def apply(
        self,
        state: ProviderState,
        task: TaskRecord,
        result: PollResult,
        *,
        was_due: float | None = None,
        held: HeldAnswer | None = None,
    ) -> None:
        """Apply one poll result to one task as it was when the poll went out.

        ``was_due``: when the poll was due, if a bulk request carried it early. ``held``: the
        answer is a held one, written again (counted as a poll when it arrived, not now; its
        receipt time decides whether it replaces a failure written since).
        """
        engine = self.engine
        received_at = held.received_at if held is not None else None
        async with self._record_sem:
            outcome = policy.classify_poll(result)
            label = state.spec.key
            if held is None:
                engine.counters.polls += 1
                self.deps.metrics.fallback_polls.labels(*label, str(outcome)).inc()
            provider_task_id = task.known_provider_task_id
            if isinstance(result, Solution):
                found = Result.solved(
                    token=result.token,
                    delivered_by=DeliveredBy.POLL,
                    provider_task_id=provider_task_id,
                    user_agent=result.user_agent,
                )
                recorded = await self.deps.ledger.record(task.ref, found, received_at=received_at)
                if recorded.outcome is Outcome.RECORDED:
                    self.deps.metrics.fallback_recoveries.labels(*label).inc()
                    engine.event(
                        task.ref,
                        EventType.NORMAL,
                        "Solved",
                        "solved; recovered by fallback poll (no pingback arrived in time)",
                    )
                await self._dead_letter_if_orphaned(task, found, recorded, received_at=received_at)
                engine.remember(recorded.task)
                return
            if outcome is PollOutcome.FAILED:
                failed = Result.failed(
                    code=result.code,
                    message=result.reason,
                    delivered_by=DeliveredBy.POLL,
                    provider_task_id=provider_task_id,
                )
                recorded = await self.deps.ledger.record(task.ref, failed, received_at=received_at)
                if recorded.outcome is Outcome.RECORDED:
                    self.deps.metrics.permanent_failures.labels(
                        *label, failure_label(result.code)
                    ).inc()
                    engine.event(
                        task.ref, EventType.WARNING, "Failed", f"{result.code}: {result.reason}"
                    )
                await self._dead_letter_if_orphaned(task, failed, recorded, received_at=received_at)
                engine.remember(recorded.task)
                return
            if outcome is PollOutcome.EXPIRED:
                await engine.fail(
                    task.ref,
                    FailureCode.RESULT_EXPIRED,
                    f"{result.code}: the provider no longer holds this task's result",
                )
                return
            await self._not_ready(state, task, result.wait_seconds, outcome, was_due=was_due)

    async def _not_ready(
        self,
        state: ProviderState,
        task: TaskRecord,
        wait_seconds: float | None,
        outcome: str,
        *,
        was_due: float | None,
    ) -> None:
        engine = self.engine
        plan = policy.after_poll(
            polls_before=self.polls.get(task.key, task.polls),
            provider=state.spec,
            now=self.deps.clock(),
            checkpoint_every=self.deps.settings.poll_status_every,
            wait_seconds=wait_seconds if outcome is PollOutcome.UNKNOWN else None,
            was_due=None if was_due is None else dt.datetime.fromtimestamp(was_due, dt.UTC),
        )
        self.polls[task.key] = plan.polls
        if plan.exhausted:
            await engine.fail(
                task.ref,
                FailureCode.POLLS_EXHAUSTED,
                f"not ready after {plan.polls} polls (spec.polling.maxPolls)",
            )
            return
        assert plan.next_due is not None
        engine.schedule_at(Kind.POLL, task.key, plan.next_due)
        if plan.checkpoint:
            now = self.deps.clock()
            written = await self.deps.ledger.update_status(
                _minimal_view(task, Phase.SUBMITTED),
                {
                    "polls": plan.polls,
                    "lastPollAt": model.format_time(now),
                    "nextPollAt": model.format_time(plan.next_due),
                },
            )
            engine.counters.status_writes += 1
            if written is not None:
                engine.store(written)

    async def _dead_letter_if_orphaned(
        self,
        task: TaskRecord,
        result: Result,
        recorded: Recorded,
        *,
        received_at: dt.datetime | None = None,
    ) -> None:
        """A result the ledger could not apply (task gone, recreated...) becomes a letter.

        If the letter cannot be written now, the result is held in :attr:`unwritten` and
        retried in the background until it is: never only logged.
        """
        if recorded.outcome is not Outcome.DEAD_LETTER or recorded.reason is None:
            return
        letter = UnwrittenLetter(
            task=task,
            result=result,
            reason=recorded.reason,
            message=f"fallback poll: {recorded.message}",
            received_at=received_at or self.deps.clock(),
        )
        error = await self._write(letter)
        if error is None:
            return
        key = (
            task.ref.namespace,
            task.ref.name,
            task.ref.uid,
            result.provider_task_id or "",
        )
        if key in self.unwritten:
            return  # the same answer twice: one retry loop holds it already
        self.unwritten[key] = letter
        self._count_unwritten(task.ref.namespace)
        logger.warning(
            "poll result of %s/%s held until its dead letter can be written: %s",
            task.ref.namespace,
            task.ref.name,
            error,
        )
        self.engine.spawn(self._keep_writing(key))

    def resume_unwritten(self) -> None:
        """Restart the retries of every held result (the engine became active again)."""
        for key in list(self.unwritten):
            self.engine.spawn(self._keep_writing(key))

    async def _keep_writing(self, key: LetterKey) -> None:
        """Retry one held letter with capped exponential back-off until it is written."""
        first, cap = self.letter_retry
        delay = first
        while (letter := self.unwritten.get(key)) is not None:
            woken = await self.engine.ledger_back(delay)
            if await self._write(letter) is None:
                self.unwritten.pop(key, None)
                self._count_unwritten(key[0])
                return
            delay = first if woken else min(cap, delay * 2)

    async def _write(self, letter: UnwrittenLetter) -> kube.KubeError | None:
        """Create the letter (idempotent); the error if the API server failed or refused."""
        task = letter.task
        try:
            name = await self.deps.ledger.dead_letter(
                namespace=task.ref.namespace,
                reason=letter.reason,
                message=letter.message,
                ref=task.ref,
                result=letter.result,
                received_at=letter.received_at,
                received_by=self.deps.identity,
                source=POLL_SOURCE,
            )
        except kube.KubeError as exc:
            return exc
        self.dead_letters += 1
        logger.info(
            "poll result of %s/%s dead-lettered as %s (%s)",
            task.ref.namespace,
            task.ref.name,
            name,
            letter.reason,
        )
        return None

    def _count_unwritten(self, namespace: str) -> None:
        held = sum(1 for key in self.unwritten if key[0] == namespace)
        self.deps.metrics.ensure_namespace(namespace)
        self.deps.metrics.dead_letters_unwritten.labels(namespace).set(held)
