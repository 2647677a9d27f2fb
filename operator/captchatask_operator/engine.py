"""The operator's engine: in-memory indexes, one timer, and the parts that act on them.

kopf feeds it watch events (``observe_task`` / ``observe_provider`` / ``observe_letter``, cheap
and synchronous); the engine decides with the pure functions of
:mod:`~captchatask_operator.policy` and :mod:`captchatask.deadletters` and acts in background
asyncio tasks. The actions live in one module per concern, each a small class that sees the
engine only through :class:`~captchatask_operator.actions.EngineActions` (what it may read and
ask) and :class:`~captchatask_operator.actions.Deps` (what it uses); none imports this module:

* :mod:`~captchatask_operator.providers`: key Secret, account check, ``Ready`` condition;
* :mod:`~captchatask_operator.submission`: intent (pinned resourceVersion), ``in.php``,
  ``Submitted`` with the provider id (see docs/concepts/operator, "Crash safety of submission");
* :mod:`~captchatask_operator.polling`: the tasks of one provider due at the same moment go out
  in one ``get_results`` call; a result whose task is gone becomes a dead letter;
* :mod:`~captchatask_operator.requeue`: the dead-letter requeue loop;
* :mod:`~captchatask_operator.endings`: failing a task (deadline, spec, provider verdict) and
  deleting it after its TTL.

*When* each timed action runs (polls, deadlines, TTLs, submission back-offs, provider re-checks,
dead-letter attempts and deletions) is :class:`~.timer.Timer`'s; *what* it does is decided here,
in :meth:`Engine._dispatch`. This module keeps what the parts share: the indexes, the admission
queues, the per-task action lock (:meth:`Engine.run`) and the reconciliation of one task with
the schedule and the queues. Every task status write is a compare-and-set through
:class:`captchatask.ledger.Ledger`; a lost race is never an error, only a reason to re-read and
re-decide. The engine holds no state that is not reconstructible from the cluster:
:meth:`Engine.activate` lists tasks, providers and dead letters, so a restarted (or newly active
standby) operator resumes exactly where the ledger says.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fnmatch
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Final

import aiohttp

from captchatask import kube
from captchatask.events import EventRecorder, EventType, ObjectRef, is_routine
from captchatask.ledger import Ledger
from captchatask.model import DeliveredBy, Phase, TaskRef, TaskView
from captchatask.signing import PingbackSigner
from captchatask.supervise import Supervisor
from captchatask_operator import policy
from captchatask_operator.actions import Counters, Deps, ProviderState
from captchatask_operator.endings import Endings
from captchatask_operator.index import TaskIndex
from captchatask_operator.metrics import ACTION_LOOP, Metrics
from captchatask_operator.policy import FailureCode
from captchatask_operator.polling import Poller
from captchatask_operator.providers import ProviderChecks
from captchatask_operator.queueing import ProviderQueue
from captchatask_operator.records import ProviderSpec, TaskRecord
from captchatask_operator.requeue import Requeuer
from captchatask_operator.schedule import Kind
from captchatask_operator.settings import Settings
from captchatask_operator.submission import Submitter
from captchatask_operator.timer import EntryKey, Timer

logger = logging.getLogger(__name__)

TaskKey = tuple[str, str]
ProviderKey = tuple[str, str]

COMPONENT: Final = "captchatask-operator"
DEADLINE_MESSAGE: Final = "no result before the deadline (spec.deadlineSeconds)"
#: Schedule kinds that belong to a task (cancelled when the task goes away).
_TASK_KINDS: Final = (Kind.POLL, Kind.DEADLINE, Kind.TTL, Kind.SUBMIT)


def utcnow() -> dt.datetime:
    """The real clock."""
    return dt.datetime.now(dt.UTC)


class Engine:
    """Indexes, queues, the schedule and the parts that act; see the module docstring.

    Parameters
    ----------
    client
        API client (the operator's own session).
    http
        Session for the solver API (owned by the caller).
    signer
        Pingback signer, or ``None`` when no key file is configured (then providers with a
        public URL report ``PingbackKeyMissing``).
    settings
        Operator settings.
    metrics
        Metric series.
    events
        Event recorder.
    clock
        Source of "now" (UTC).
    instance
        This replica's name (the pod), recorded as ``receivedBy`` on dead letters it writes.
    """

    def __init__(
        self,
        *,
        client: kube.KubeClient,
        http: aiohttp.ClientSession,
        signer: PingbackSigner | None,
        settings: Settings,
        metrics: Metrics,
        events: EventRecorder,
        clock: Callable[[], dt.datetime] = utcnow,
        instance: str = "",
    ) -> None:
        self.client = client
        self.ledger = Ledger(client, clock=clock)
        self.http = http
        self.signer = signer
        self.settings = settings
        self.metrics = metrics
        self.events = events
        self.clock = clock
        self.identity = f"{COMPONENT}/{instance}" if instance else COMPONENT
        self.tasks = TaskIndex()
        self.providers: dict[ProviderKey, ProviderState] = {}
        self.queues: dict[ProviderKey, ProviderQueue] = {}
        self.timer = Timer(clock=clock, dispatch=self._dispatch, flush=self._flush_polls)
        #: The timer runs supervised: a bug in a dispatch must not end every poll and deadline.
        self.timer_loop = Supervisor(name="timer", loop=self.timer.run)
        self.timer_loop.on_crash = metrics.track_loop(
            "timer", healthy=lambda: not self.active or self.timer_loop.healthy
        )
        #: The timer's schedule (read by tests and introspection).
        self.schedule = self.timer.schedule
        self.counters = Counters()
        self.busy: set[TaskKey] = set()
        #: The last time the API server did not answer (see policy.submission_step).
        self.ledger_unavailable_at: dt.datetime | None = None
        #: The first failure of that outage (see policy.OUTAGE_GAP), moved later by every stretch
        #: in which the probe saw the API server answer: ``at - since`` is the time it was away.
        self.ledger_unavailable_since: dt.datetime | None = None
        #: When the probe last saw the API server answer after a failure.
        self.ledger_answered_at: dt.datetime | None = None
        #: Failures closer together than this are one outage (policy.OUTAGE_GAP; a test seam).
        self.outage_gap: dt.timedelta = policy.OUTAGE_GAP
        #: Set (and replaced) when the probe sees the API server answer after a failure: wakes
        #: the writers waiting in :meth:`ledger_back`.
        self._ledger_returned = asyncio.Event()
        #: When this engine last became active (an outage before it is unknown to it).
        self.active_since: dt.datetime | None = None
        self.submitting = 0
        self._ops: set[asyncio.Task[None]] = set()
        self._timer: asyncio.Task[None] | None = None
        self._active_refs = 0
        self._lock = asyncio.Lock()
        self.active = False
        self.synced = False
        deps = Deps(
            client=client,
            ledger=self.ledger,
            http=http,
            signer=signer,
            settings=settings,
            metrics=metrics,
            events=events,
            clock=clock,
            identity=self.identity,
        )
        self.checks = ProviderChecks(self, deps)
        self.submitter = Submitter(self, deps)
        self.poller = Poller(self, deps)
        self.requeuer = Requeuer(self, deps)
        self.endings = Endings(self, deps)

    # == activation ===============================================================================

    async def activate(self) -> None:
        """Become the active replica: rebuild from the cluster and start the timer.

        Reference-counted, because with namespaced peering there is one peering object (and
        one kopf daemon calling this) per namespace.
        """
        async with self._lock:
            if self._active_refs:
                self._active_refs += 1
                return
            try:
                await self._rebuild()
            except BaseException:
                # Cancelled mid-listing (kopf cancels the leader daemon the moment a peer
                # outranks this replica, and two replicas started together each resume for an
                # instant first) or failed: stay a standby holding nothing half-read. The count
                # moves only once the listing is done; counted before it, a cancelled activation
                # left it at one with the engine inactive, and every later one returned early.
                self._forget()
                raise
            self._active_refs = 1
            self.active = True
            self.active_since = self.clock()
            self._timer = asyncio.create_task(self.timer_loop.run(), name="captchatask timer")
            self.spawn(self._probe_ledger())
            logger.info(
                "engine active: %d tasks, %d providers, %d dead letters",
                len(self.tasks),
                len(self.providers),
                len(self.requeuer.letters),
            )
            for key in list(self.providers):
                self.schedule_at(Kind.PROVIDER, key, self.clock())
            for task in self.tasks.values():
                self.reconcile(task, None)
            self.requeuer.resume()
            self.poller.resume_unwritten()

    async def deactivate(self) -> None:
        """Become a standby (or stop): cancel everything and forget the in-memory state."""
        async with self._lock:
            if not self._active_refs:
                return
            self._active_refs -= 1
            if self._active_refs:
                return
            self.active = False
            tasks = [t for t in (self._timer, *self._ops) if t is not None]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._timer = None
            self._ops.clear()
            self._forget()
            logger.info("engine inactive (standby or stopping)")

    def _forget(self) -> None:
        """Drop the in-memory state a standby must not keep (the ledger is the truth)."""
        self.tasks.clear()
        self.providers.clear()
        self.queues.clear()
        self.schedule.clear()
        self.poller.batches.clear()
        self.poller.polls.clear()
        self.poller.held.clear()  # their writers are cancelled first; the next active polls
        self.busy.clear()
        self.checks.clear()
        self.requeuer.clear()
        self.submitting = 0

    def _namespace_scopes(self) -> list[str | None]:
        if self.settings.all_namespaces:
            return [None]
        if any(any(ch in ns for ch in "*?[") for ns in self.settings.namespaces):
            return [None]
        return list(self.settings.namespaces)

    def watched(self, namespace: str) -> bool:
        """Whether this operator serves ``namespace`` (``--namespace`` globs or ``-A``)."""
        if self.settings.all_namespaces:
            return True
        return any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.settings.namespaces)

    async def _rebuild(self) -> None:
        """List providers, tasks and letters: the ledger in etcd is the truth after a restart."""
        now = self.clock()
        while True:
            try:
                for scope in self._namespace_scopes():
                    providers = await self.client.list(kube.PROVIDERS, scope)
                    for body in providers.get("items") or []:
                        self.store_provider(body)
                    listed = await self.client.list(kube.TASKS, scope, timeout=60.0)
                    for body in listed.get("items") or []:
                        record = TaskRecord.from_body(body, now=now)
                        if self.watched(record.ref.namespace):
                            self.tasks.put(record)
                    letters = await self.client.list(kube.DEAD_LETTERS, scope, timeout=60.0)
                    for body in letters.get("items") or []:
                        self.requeuer.store(body)
                break
            except kube.KubeError as exc:
                logger.warning("initial listing failed, retrying: %s", exc)
                await asyncio.sleep(policy.API_RETRY.total_seconds())
        self.synced = True

    # == watch events (synchronous, cheap) ========================================================

    def observe_task(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Take one watch event of a CaptchaTask (called by the kopf event handler)."""
        if not self.active:
            return
        record = TaskRecord.from_body(body, now=self.clock())
        if not self.watched(record.ref.namespace):
            return
        if event_type == "DELETED":
            self.forget(record.key)
            return
        old = self.tasks.get(record.key)
        if old is not None and old.ref.uid != record.ref.uid:
            self.forget(record.key)
            old = None
        self.tasks.put(record)
        self.reconcile(record, old)
        self.requeuer.task_seen(record, old)

    def observe_provider(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Take one watch event of a CaptchaProvider."""
        if not self.active:
            return
        spec = ProviderSpec.from_body(body)
        if not self.watched(spec.namespace):
            return
        if event_type == "DELETED":
            self.providers.pop(spec.key, None)
            self.schedule.cancel((Kind.PROVIDER, *spec.key))
            self.reconsider_provider_tasks(spec.key)
            return
        state = self.providers.get(spec.key)
        changed = state is None or state.spec.generation != spec.generation
        if state is not None and state.spec.uid != spec.uid:
            changed = True
        self.store_provider(body)
        if changed:
            self.schedule_at(Kind.PROVIDER, spec.key, self.clock())

    def observe_letter(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Take one watch event of a CaptchaDeadLetter."""
        if self.active:
            self.requeuer.observe(event_type, body)

    def store_provider(self, body: Mapping[str, Any]) -> None:
        """Remember a provider body (listing, watch event, or our own status write)."""
        spec = ProviderSpec.from_body(body)
        if not self.watched(spec.namespace):
            return
        state = self.providers.get(spec.key)
        if state is None or state.spec.uid != spec.uid:
            self.providers[spec.key] = ProviderState(spec=spec)
        else:
            state.spec = spec
        self.metrics.ensure_provider(*spec.key)
        self.queues.setdefault(spec.key, ProviderQueue())

    # == per-task reconciliation ==================================================================

    def forget(self, key: TaskKey) -> None:
        """A task is gone: drop its schedule entries, poll counter and queue slot."""
        task = self.tasks.pop(key)
        for kind in _TASK_KINDS:
            self.schedule.cancel((kind, *key))
        self.poller.polls.pop(key, None)
        if task is not None:
            queue = self.queues.get(task.provider_key)
            if queue is not None:
                queue.discard(key)
                self.pump(task.provider_key)

    def reconcile(self, task: TaskRecord, old: TaskRecord | None) -> None:
        """Bring the schedule and the queues in line with one task as last seen."""
        key = task.key
        if task.deleting:
            self.forget(key)
            return
        if task.terminal:
            self._on_terminal(task, old)
            return
        self.schedule.set((Kind.DEADLINE, *key), task.deadline.timestamp())
        self.timer.wake_if_earliest((Kind.DEADLINE, *key))
        if task.phase is Phase.SUBMITTED:
            self._on_submitted(task)
            return
        if key in self.busy:
            return  # the running action re-decides when it finishes
        self._consider_submission(task)

    def _on_terminal(self, task: TaskRecord, old: TaskRecord | None) -> None:
        key = task.key
        for kind in (Kind.POLL, Kind.DEADLINE, Kind.SUBMIT):
            self.schedule.cancel((kind, *key))
        self.poller.polls.pop(key, None)
        queue = self.queues.get(task.provider_key)
        if queue is not None and (key in queue.in_flight or key in queue):
            queue.discard(key)
            self.pump(task.provider_key)
        if (
            old is not None
            and old.phase is Phase.FAILED
            and old.delivered_by is None
            and task.delivered_by is not None
        ):
            # The one change of a finished task: a result a receiver had acknowledged before
            # our own failure replaced it (captchatask.decision.decide). Say so where users look.
            self.event(
                task.ref,
                EventType.WARNING,
                "FailureReplaced",
                f"a result received before the failure replaced it; the task is now {task.phase}",
            )
        if old is not None and not old.terminal and task.phase is Phase.SOLVED:
            delivered = task.delivered_by or DeliveredBy.PINGBACK
            finished = task.finished_at or self.clock()
            self.metrics.ensure_provider(*task.provider_key)
            self.metrics.solve_duration.labels(*task.provider_key, str(delivered)).observe(
                max(0.0, (finished - task.created_at).total_seconds())
            )
        due = policy.ttl_due(task)
        if due is not None:
            self.schedule_at(Kind.TTL, key, due)

    def _on_submitted(self, task: TaskRecord) -> None:
        key = task.key
        queue = self.queues.setdefault(task.provider_key, ProviderQueue())
        queue.occupy(key)
        self.schedule.cancel((Kind.SUBMIT, *key))
        if key in self.poller.polls:
            return  # already polling: our own status writes come back as watch events
        provider = self.providers.get(task.provider_key)
        if provider is None:
            return  # polled once its provider appears (reconsider_provider_tasks)
        plan = policy.resume_polls(
            task,
            provider.spec,
            now=self.clock(),
            checkpoint_every=self.settings.poll_status_every,
        )
        self.poller.polls[key] = plan.polls
        self.schedule_at(Kind.POLL, key, plan.due)

    def _consider_submission(self, task: TaskRecord) -> None:
        state = self.providers.get(task.provider_key)
        if state is not None and not state.checked and not task.spec_provider_task_id:
            return  # decided after the provider's first check (no spurious "not ready" writes)
        step = policy.submission_step(
            task,
            provider=state.spec if state else None,
            provider_ready=bool(state and state.ready),
            provider_reason=state.reason if state else "NotFound",
            now=self.clock(),
            max_attempts=self.settings.max_submit_attempts,
            poll_only_grace=self.settings.intent_grace_seconds,
            ledger_unavailable_at=self.ledger_unavailable_at,
            ledger_unavailable_since=self.ledger_unavailable_since,
            active_since=self.active_since,
        )
        key = task.key
        queue = self.queues.setdefault(task.provider_key, ProviderQueue())
        if step.kind is policy.StepKind.NONE:
            return
        if step.kind is policy.StepKind.ADOPT:
            self.run(key, self.submitter.adopt(task))
        elif step.kind in (policy.StepKind.AWAIT_ID, policy.StepKind.PARK):
            queue.discard(key)
            if task.waiting_reason != step.reason:
                self.run(key, self.submitter.write_waiting(task, step.reason, step.message))
        elif step.kind is policy.StepKind.WAIT:
            queue.discard(key)
            assert step.at is not None
            self.schedule_at(Kind.SUBMIT, key, step.at)
        elif step.kind is policy.StepKind.FAIL:
            queue.discard(key)
            self.run(key, self.fail(task.ref, step.reason, step.message, reason=step.reason))
        else:
            assert state is not None
            queue.wait(key, task.created_at)
            free = queue.free_slots(state.spec.max_in_flight)
            if free == 0 and task.phase is not Phase.QUEUED and key not in self.busy:
                self.run(
                    key,
                    self.submitter.write_waiting(
                        task, policy.WaitReason.QUEUED, "the provider's maxInFlight is reached"
                    ),
                )
            self.pump(task.provider_key)

    def reconsider_provider_tasks(self, provider_key: ProviderKey) -> None:
        """Re-decide every task of a provider (it appeared, vanished, or changed readiness)."""
        for task in [t for t in self.tasks.values() if t.provider_key == provider_key]:
            self.reconcile(task, None)

    def provider_not_ready(self, state: ProviderState, verdict: policy.ProviderVerdict) -> None:
        """A request just failed with a configuration error: stop submitting, re-check soon."""
        self.checks.mark_not_ready(state, verdict)

    def in_flight(self, provider_key: ProviderKey) -> int:
        """How many of a provider's tasks are submitted and not finished."""
        return len(self.queues.setdefault(provider_key, ProviderQueue()).in_flight)

    def pump(self, provider_key: ProviderKey) -> None:
        """Start submissions for the oldest waiting tasks that fit the provider's cap."""
        if not self.active:
            return
        state = self.providers.get(provider_key)
        queue = self.queues.get(provider_key)
        if state is None or queue is None or not state.ready or not len(queue):
            return
        room = self.settings.submit_concurrency - self.submitting
        if room <= 0:
            return
        for key in queue.admit(state.spec.max_in_flight, limit=room):
            task = self.tasks.get(key)
            if task is None or key in self.busy:
                queue.discard(key)
                continue
            self.submitting += 1
            self.run(key, self.submitter.submit(task), submitting=True)

    # == scheduling ===============================================================================

    async def _probe_ledger(self) -> None:
        """Notice every API server outage, not only those an action of ours runs into.

        The unresolved-intent rule (:func:`policy.submission_step`) stretches the pingback
        grace by the last outage: pingbacks the receivers spooled meanwhile are recorded only
        once they have caught up. An outage during which the operator had nothing to write
        would go unseen, and an ``in.php`` whose reply was lost right after it be repeated
        while its pingback still waits in a spool. Runs while active; cancelled on deactivate.
        """
        answered_after: dt.datetime | None = None
        while True:
            try:
                await self.client.request("GET", "/version", timeout=5.0)
            except kube.KubeUnavailable:
                self.note_ledger_unavailable()
            except Exception as exc:  # noqa: BLE001 - a probe must never end the loop
                logger.debug("API server probe failed: %r", exc)
            else:
                failed_at = self.ledger_unavailable_at
                if failed_at is not None and failed_at != answered_after:
                    # A failure (ours or an action's) since the last answer: it is back now.
                    answered_after = failed_at
                    self.ledger_answered_at = self.clock()
                    self._wake_ledger_writers()
            await asyncio.sleep(policy.LEDGER_PROBE_SECONDS)

    def _wake_ledger_writers(self) -> None:
        """Wake every writer waiting in :meth:`ledger_back` (the API server answers again)."""
        returned, self._ledger_returned = self._ledger_returned, asyncio.Event()
        returned.set()

    async def ledger_back(self, timeout: float) -> bool:
        """Wait ``timeout`` seconds, or until the probe sees the API server answer again.

        Held poll answers, unwritten dead letters and provider task ids not yet written retry
        with back-off; the probe (every :data:`policy.LEDGER_PROBE_SECONDS`) ends their wait
        when the API server is back, so what they hold reaches the ledger at once, not up to a
        back-off step later (an operator killed in that step loses held answers). ``True`` if
        woken.
        """
        returned = self._ledger_returned
        try:
            await asyncio.wait_for(returned.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def note_ledger_unavailable(self) -> None:
        """Record a call the API server did not answer: the outage's start and last failure.

        Failures less than :attr:`outage_gap` (:data:`policy.OUTAGE_GAP`) apart are one outage
        (the receivers may still be replaying the first one's backlog when the second begins),
        but a stretch in which the probe saw the API server answer is not part of its length:
        the start moves later by it. Counting it would hold every unresolved intent back by
        that much more (two outages 11 s apart once cost tasks 11 s of waiting the receivers did
        not need).
        """
        now = self.clock()
        last = self.ledger_unavailable_at
        since = self.ledger_unavailable_since
        answered = self.ledger_answered_at
        if last is None or since is None or now - last > self.outage_gap:
            self.ledger_unavailable_since = now
        elif answered is not None and answered > last:
            self.ledger_unavailable_since = since + (now - last)
        self.ledger_unavailable_at = now

    def schedule_at(self, kind: Kind, key: tuple[str, str], due: dt.datetime) -> None:
        """Put (or move) one timed action on the schedule; wake the timer if it is earliest."""
        self.timer.at(kind, key, due)

    def schedule_no_later(self, kind: Kind, key: tuple[str, str], due: dt.datetime) -> None:
        """Like :meth:`schedule_at`, but never postpones an entry that is due earlier."""
        self.timer.no_later(kind, key, due)

    def unschedule(self, kind: Kind, key: tuple[str, str]) -> None:
        """Drop one timed action from the schedule (if it is there)."""
        self.timer.cancel(kind, key)

    def take_polls(
        self, provider_key: ProviderKey, *, by: float, limit: int
    ) -> list[tuple[TaskKey, float]]:
        """Take up to ``limit`` of a provider's polls due by ``by`` off the schedule (earliest).

        The poller calls this when a bulk request goes out anyway, to carry polls due within
        the batching window (early) instead of sending them in a request of their own.
        """

        def of_provider(entry: EntryKey) -> bool:
            kind, namespace, name = entry
            if kind is not Kind.POLL:
                return False
            task = self.tasks.get((namespace, name))
            return task is not None and task.provider_key == provider_key

        taken = self.timer.schedule.take_due(by, accept=of_provider, limit=limit)
        return [((namespace, name), due) for (_kind, namespace, name), due in taken]

    def _flush_polls(self, now: float) -> float | None:
        return self.poller.flush(now)

    def _dispatch(self, entries: Iterable[tuple[EntryKey, float]]) -> None:
        for (kind, namespace, name), due in entries:
            key = (namespace, name)
            if kind is Kind.PROVIDER:
                self.checks.start(key)
                continue
            if kind in (Kind.LETTER, Kind.LETTER_TTL):
                self.requeuer.due(kind, key)
                continue
            task = self.tasks.get(key)
            if task is None:
                continue
            if kind is Kind.POLL:
                self.poller.collect(task.provider_key, key, due=due)
            elif kind is Kind.DEADLINE:
                if not task.terminal and not self.run(
                    key,
                    self.fail(task.ref, FailureCode.DEADLINE_EXCEEDED, DEADLINE_MESSAGE),
                    retry_kind=Kind.DEADLINE,
                ):
                    self.schedule_at(Kind.DEADLINE, key, self.clock() + policy.BUSY_RETRY)
            elif kind is Kind.TTL:
                self.spawn(self.endings.delete(task))
            elif kind is Kind.SUBMIT:
                self.reconcile(task, None)

    # == running actions ==========================================================================

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine in the background; cancelled when the engine deactivates."""
        self._start(coro)

    def _start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._ops.add(task)
        task.add_done_callback(self._op_done)
        return task

    def _op_done(self, task: asyncio.Task[None]) -> None:
        """Forget a finished action; log and count one that raised (else it would go unseen)."""
        self._ops.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.metrics.loop_crashes.labels(ACTION_LOOP).inc()
            logger.error("background action crashed", exc_info=exc)

    def unhealthy_loops(self) -> list[str]:
        """Supervised loops that keep crashing (readiness lists them; empty when standby)."""
        if self.active and not self.timer_loop.healthy:
            return ["the timer keeps crashing"]
        return []

    def run(
        self,
        key: TaskKey,
        coro: Coroutine[Any, Any, Any],
        *,
        submitting: bool = False,
        retry_kind: Kind | None = None,
    ) -> bool:
        """Run one action on one task, never two at once; re-decide when it ends.

        Returns whether the action started (``False``: another one is running on the task).
        """
        if key in self.busy:
            coro.close()
            if submitting:
                self.submitting -= 1
            return False
        self.busy.add(key)

        async def wrapper() -> None:
            postponed = True
            try:
                await coro
                postponed = False
            except kube.KubeError as exc:
                if isinstance(exc, kube.KubeUnavailable):
                    self.note_ledger_unavailable()
                logger.warning("action on %s/%s postponed: %s", *key, exc)
                self.schedule_at(retry_kind or Kind.SUBMIT, key, self.clock() + policy.API_RETRY)
            except Exception:
                logger.exception("action on %s/%s failed", *key)
                self.schedule_at(Kind.SUBMIT, key, self.clock() + policy.API_RETRY)
            finally:
                self.busy.discard(key)
                if submitting:
                    self.submitting -= 1
                # A postponed action has its retry scheduled: re-deciding now would start it
                # again at once and spin while the API server is away.
                self._after_action(key, submitting=submitting, postponed=postponed)

        # A deactivation can cancel the wrapper before it starts, and then nothing awaits the
        # action: close it, or Python warns that it was never awaited.
        self._start(wrapper()).add_done_callback(lambda _: coro.close())
        return True

    def _after_action(self, key: TaskKey, *, submitting: bool, postponed: bool = False) -> None:
        task = self.tasks.get(key)
        if postponed and task is not None:
            if submitting and task.phase is not Phase.SUBMITTED:
                # Free the slot the admission reserved: the retry queues the task again, and a
                # slot still held would make that a no-op (the task would never be submitted).
                queue = self.queues.get(task.provider_key)
                if queue is not None:
                    queue.discard(key)
            return
        if task is not None and self.active:
            if task.phase is not Phase.SUBMITTED and not task.terminal:
                queue = self.queues.get(task.provider_key)
                if queue is not None and submitting:
                    queue.discard(key)
                self.reconcile(task, None)
            if submitting:
                self.pump(task.provider_key)
        elif task is None and submitting:
            for queue in self.queues.values():
                queue.discard(key)

    def remember(self, view: TaskView | None) -> TaskRecord | None:
        """Adopt a body we just read or wrote as the freshest record of that task."""
        if view is None:
            return None
        record = TaskRecord.from_view(view, now=self.clock())
        old = self.tasks.get(record.key)
        if old is not None and old.ref.uid != record.ref.uid:
            return record
        self.tasks.put(record)
        if record.terminal or record.phase is Phase.SUBMITTED:
            self.reconcile(record, old)
        return record

    def store(self, view: TaskView) -> TaskRecord:
        """Store a body we just read or wrote, without re-deciding (the caller does)."""
        record = TaskRecord.from_view(view, now=self.clock())
        self.tasks.put(record)
        return record

    def event(self, ref: TaskRef, type_: EventType, reason: str, message: str) -> None:
        """Post an Event on a task instance (queued; never blocks).

        Routine Events (:func:`captchatask.events.is_routine`) are counted instead of posted
        unless ``--routine-events``: they cost a write and about as much etcd as the task.
        """
        if not self.settings.routine_events and is_routine(type_, reason):
            self.metrics.events_skipped.labels(reason).inc()
            return
        self.events.emit(ObjectRef.task(ref), type_, reason, message)

    async def fresh_compact(self, ref: TaskRef) -> TaskView | None:
        """Like :meth:`fresh`, but drop the task's managedFields in the same request.

        Called where the operator would GET the task anyway (before a submission intent), so the
        read becomes a PATCH: once a task has no managedFields the API server records none for
        later non-apply writes, which keeps about 1 KiB of field-ownership bookkeeping out of
        every task in etcd. Anything unexpected falls back to the plain read.
        """
        if not self.settings.strip_managed_fields:
            return await self.fresh(ref)
        try:
            view = await self.ledger.strip_managed_fields(ref)
        except kube.ApiError:
            view = None
        if view is None or view.deleting:
            return await self.fresh(ref)
        return view

    async def fresh(self, ref: TaskRef) -> TaskView | None:
        """GET a task; ``None`` if it is gone, being deleted, or another instance."""
        view = await self.ledger.get_task(ref.namespace, ref.name)
        if view is None or view.deleting or view.ref.uid != ref.uid:
            return None
        return view

    # == failing and deleting =====================================================================

    async def fail(
        self,
        ref: TaskRef,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        view: TaskView | None = None,
    ) -> None:
        """Fail a task with ``code`` unless it already has an outcome (see :mod:`.endings`)."""
        await self.endings.fail(ref, code, message, reason=reason, view=view)

    # == introspection ============================================================================

    def refresh_gauges(self) -> None:
        """Recompute gauges from the in-memory indexes (called on scrape)."""
        self.metrics.set_task_counts(self.tasks.counts())
        self.metrics.set_past_deadline_counts(self.tasks.past_deadline_counts(self.clock()))
        self.metrics.set_dead_letter_counts(self.requeuer.letters.counts())
        self.metrics.active.set(1 if self.active else 0)
