"""The operator's engine: an in-memory index of tasks and providers, one timer, and the actions.

kopf feeds it watch events (``observe_task`` / ``observe_provider``, cheap and synchronous);
the engine decides with the pure functions of :mod:`~captchatask_operator.policy` and acts in
background asyncio tasks:

* **submission** (``_submit``): fresh GET, intent written with a pinned resourceVersion, then
  ``in.php``, then ``Submitted`` with the provider id (see ``docs/readme/operator.md`` for the
  crash window in between);
* **fallback polling** (``_poll_batch``): the tasks of one provider due at the same moment go
  out in one ``get_results`` call (bulk ``ids=`` where the client uses it);
* **failure, TTL deletion, provider checks**, all from the one :class:`~.schedule.Schedule`.

Every task status write is a compare-and-set through :class:`captchatask.ledger.Ledger`; a lost
race is never an error, only a reason to re-read and re-decide. The engine holds no state that
is not reconstructible from the cluster: :meth:`Engine.activate` lists tasks and providers, so a
restarted (or newly active standby) operator resumes exactly where the ledger says.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import fnmatch
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import aiohttp

from captchatask import kube, model
from captchatask.events import EventRecorder, EventType, ObjectRef
from captchatask.ledger import (
    CONDITION_COMPLETE,
    CONDITION_SUBMITTED,
    Ledger,
    Outcome,
    Result,
    result_status,
    set_condition,
)
from captchatask.model import DeliveredBy, Phase, TaskRef, TaskView
from captchatask.provider import tasks as provider_tasks
from captchatask.provider.client import PollResult, ProviderClient
from captchatask.provider.codes import Dialect, Verdict
from captchatask.provider.errors import ProviderError
from captchatask.provider.replies import Solution, ThreadsInfo
from captchatask.signing import PingbackSigner
from captchatask_operator import policy
from captchatask_operator.metrics import Metrics, failure_label
from captchatask_operator.policy import FailureCode, PollOutcome, StepKind, WaitReason
from captchatask_operator.queueing import ProviderQueue
from captchatask_operator.records import ProviderSpec, TaskRecord
from captchatask_operator.schedule import Kind, Schedule
from captchatask_operator.settings import Settings

logger = logging.getLogger(__name__)

TaskKey = tuple[str, str]
ProviderKey = tuple[str, str]
EntryKey = tuple[Kind, str, str]

COMPONENT: Final = "captchatask-operator"
#: How often a lost compare-and-set is re-read and retried before the action is rescheduled.
MAX_CAS_RETRIES: Final = 5
#: When the API server is away, retry an action after this long.
API_RETRY_SECONDS: Final = 2.0
#: Concurrent ledger writes for the results of one poll batch.
RECORD_CONCURRENCY: Final = 16
#: Wait after a request-level poll failure without a documented wait.
DEFAULT_POLL_ERROR_WAIT: Final = 5.0
DEADLINE_MESSAGE: Final = "no result before the deadline (spec.deadlineSeconds)"
#: Retry an action this soon when another action on the same task is still running.
BUSY_RETRY: Final = dt.timedelta(seconds=0.5)
#: Retry a poll this soon while its provider has not been checked yet (operator startup).
UNCHECKED_RETRY: Final = dt.timedelta(seconds=0.5)


def utcnow() -> dt.datetime:
    """The real clock."""
    return dt.datetime.now(dt.UTC)


@dataclass(slots=True)
class ProviderState:
    """What the engine knows about one provider beyond its spec."""

    spec: ProviderSpec
    ready: bool = False
    reason: str = "Unknown"
    message: str = "not checked yet"
    client: ProviderClient | None = None
    key_version: str | None = None
    client_generation: int = -1
    threads: ThreadsInfo | None = None
    balance: float | None = None
    error_code: str | None = None
    checked: bool = False


@dataclass(slots=True)
class Counters:
    """Engine-level counters for the scaling measurement and tests."""

    submits: int = 0
    polls: int = 0
    poll_requests: int = 0
    status_writes: int = 0


def _minimal_view(task: TaskRecord, phase: Phase) -> TaskView:
    """A view carrying just what a phase-pinned status write needs (no GET)."""
    return TaskView.from_body(
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


def _camel(code: str) -> str:
    """``ERROR_CAPTCHA_UNSOLVABLE`` -> ``CaptchaUnsolvable``; CamelCase codes stay as they are."""
    if "_" not in code and code[:1].isupper() and not code.isupper():
        return code
    words = code.removeprefix("ERROR_").replace(":", " ").replace("_", " ").split()
    return "".join(w[:1].upper() + w[1:].lower() for w in words if w.isalnum()) or "Failed"


class Engine:
    """Tasks, providers, the schedule and the actions; see the module docstring.

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
    ) -> None:
        self.client = client
        self.ledger = Ledger(client, clock=clock)
        self.http = http
        self.signer = signer
        self.settings = settings
        self.metrics = metrics
        self.events = events
        self.clock = clock
        self.tasks: dict[TaskKey, TaskRecord] = {}
        self.providers: dict[ProviderKey, ProviderState] = {}
        self.queues: dict[ProviderKey, ProviderQueue] = {}
        self.schedule: Schedule[EntryKey] = Schedule()
        self.polls: dict[TaskKey, int] = {}
        self.counters = Counters()
        self._busy: set[TaskKey] = set()
        self._checking: set[ProviderKey] = set()
        self._submitting = 0
        self._wake = asyncio.Event()
        self._ops: set[asyncio.Task[None]] = set()
        self._timer: asyncio.Task[None] | None = None
        self._poll_sem = asyncio.Semaphore(settings.poll_concurrency)
        self._record_sem = asyncio.Semaphore(RECORD_CONCURRENCY)
        self._active_refs = 0
        self._lock = asyncio.Lock()
        self.active = False
        self.synced = False

    # == activation ===============================================================================

    async def activate(self) -> None:
        """Become the active replica: rebuild from the cluster and start the timer.

        Reference-counted, because with namespaced peering there is one peering object (and
        one kopf daemon calling this) per namespace.
        """
        async with self._lock:
            self._active_refs += 1
            if self._active_refs > 1:
                return
            await self._rebuild()
            self.active = True
            self._timer = asyncio.create_task(self._timer_loop(), name="captchatask timer")
            logger.info(
                "engine active: %d tasks, %d providers", len(self.tasks), len(self.providers)
            )
            for key in list(self.providers):
                self._schedule(Kind.PROVIDER, key, self.clock())
            for task in list(self.tasks.values()):
                self._reconcile(task, None)

    async def deactivate(self) -> None:
        """Become a standby (or stop): cancel everything and forget the in-memory state."""
        async with self._lock:
            self._active_refs = max(0, self._active_refs - 1)
            if self._active_refs > 0 or not self.active:
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
            self.tasks.clear()
            self.providers.clear()
            self.queues.clear()
            self.schedule.clear()
            self.polls.clear()
            self._busy.clear()
            self._checking.clear()
            self._submitting = 0
            logger.info("engine inactive (standby or stopping)")

    def _namespace_scopes(self) -> list[str | None]:
        if self.settings.all_namespaces:
            return [None]
        if any(any(ch in ns for ch in "*?[") for ns in self.settings.namespaces):
            return [None]
        return list(self.settings.namespaces)

    def _watched(self, namespace: str) -> bool:
        if self.settings.all_namespaces:
            return True
        return any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.settings.namespaces)

    async def _rebuild(self) -> None:
        """List providers and tasks: the ledger in etcd is the truth after any restart."""
        now = self.clock()
        while True:
            try:
                for scope in self._namespace_scopes():
                    providers = await self.client.list(kube.PROVIDERS, scope)
                    for body in providers.get("items") or []:
                        self._store_provider(body)
                    listed = await self.client.list(kube.TASKS, scope, timeout=60.0)
                    for body in listed.get("items") or []:
                        record = TaskRecord.from_body(body, now=now)
                        if self._watched(record.ref.namespace):
                            self.tasks[record.key] = record
                break
            except kube.KubeError as exc:
                logger.warning("initial listing failed, retrying: %s", exc)
                await asyncio.sleep(API_RETRY_SECONDS)
        self.synced = True

    # == watch events (synchronous, cheap) ========================================================

    def observe_task(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Take one watch event of a CaptchaTask (called by the kopf event handler)."""
        if not self.active:
            return
        record = TaskRecord.from_body(body, now=self.clock())
        if not self._watched(record.ref.namespace):
            return
        if event_type == "DELETED":
            self._forget(record.key)
            return
        old = self.tasks.get(record.key)
        if old is not None and old.ref.uid != record.ref.uid:
            self._forget(record.key)
            old = None
        self.tasks[record.key] = record
        self._reconcile(record, old)

    def observe_provider(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Take one watch event of a CaptchaProvider."""
        if not self.active:
            return
        spec = ProviderSpec.from_body(body)
        if not self._watched(spec.namespace):
            return
        if event_type == "DELETED":
            self.providers.pop(spec.key, None)
            self.schedule.cancel((Kind.PROVIDER, *spec.key))
            self._reconsider_provider_tasks(spec.key)
            return
        state = self.providers.get(spec.key)
        changed = state is None or state.spec.generation != spec.generation
        if state is not None and state.spec.uid != spec.uid:
            changed = True
        self._store_provider(body)
        if changed:
            self._schedule(Kind.PROVIDER, spec.key, self.clock())

    def _store_provider(self, body: Mapping[str, Any]) -> None:
        spec = ProviderSpec.from_body(body)
        if not self._watched(spec.namespace):
            return
        state = self.providers.get(spec.key)
        if state is None or state.spec.uid != spec.uid:
            self.providers[spec.key] = ProviderState(spec=spec)
        else:
            state.spec = spec
        self.metrics.ensure_provider(spec.name)
        self.queues.setdefault(spec.key, ProviderQueue())

    # == per-task reconciliation ==================================================================

    def _forget(self, key: TaskKey) -> None:
        task = self.tasks.pop(key, None)
        for kind in (Kind.POLL, Kind.DEADLINE, Kind.TTL, Kind.SUBMIT):
            self.schedule.cancel((kind, *key))
        self.polls.pop(key, None)
        if task is not None:
            queue = self.queues.get(task.provider_key)
            if queue is not None:
                queue.discard(key)
                self._pump(task.provider_key)

    def _reconcile(self, task: TaskRecord, old: TaskRecord | None) -> None:
        """Bring the schedule and the queues in line with one task as last seen."""
        key = task.key
        if task.deleting:
            self._forget(key)
            return
        if task.terminal:
            self._on_terminal(task, old)
            return
        self.schedule.set((Kind.DEADLINE, *key), task.deadline.timestamp())
        self._wake_if_earliest((Kind.DEADLINE, *key))
        if task.phase is Phase.SUBMITTED:
            self._on_submitted(task, old)
            return
        if key in self._busy:
            return  # the running action re-decides when it finishes
        self._consider_submission(task)

    def _on_terminal(self, task: TaskRecord, old: TaskRecord | None) -> None:
        key = task.key
        for kind in (Kind.POLL, Kind.DEADLINE, Kind.SUBMIT):
            self.schedule.cancel((kind, *key))
        self.polls.pop(key, None)
        queue = self.queues.get(task.provider_key)
        if queue is not None and (key in queue.in_flight or key in queue):
            queue.discard(key)
            self._pump(task.provider_key)
        if old is not None and not old.terminal and task.phase is Phase.SOLVED:
            delivered = task.delivered_by or DeliveredBy.PINGBACK
            finished = task.finished_at or self.clock()
            self.metrics.ensure_provider(task.provider)
            self.metrics.solve_duration.labels(task.provider, str(delivered)).observe(
                max(0.0, (finished - task.created_at).total_seconds())
            )
        due = policy.ttl_due(task)
        if due is not None:
            self._schedule(Kind.TTL, key, due)

    def _on_submitted(self, task: TaskRecord, old: TaskRecord | None) -> None:
        key = task.key
        queue = self.queues.setdefault(task.provider_key, ProviderQueue())
        queue.occupy(key)
        self.schedule.cancel((Kind.SUBMIT, *key))
        if key in self.polls:
            return  # already polling: our own status writes come back as watch events
        provider = self.providers.get(task.provider_key)
        if provider is None:
            return  # polled once its provider appears (_reconsider_provider_tasks)
        plan = policy.resume_polls(
            task,
            provider.spec,
            now=self.clock(),
            checkpoint_every=self.settings.poll_status_every,
        )
        self.polls[key] = plan.polls
        self._schedule(Kind.POLL, key, plan.due)
        del old  # kept in the signature for symmetry with _on_terminal

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
        )
        key = task.key
        queue = self.queues.setdefault(task.provider_key, ProviderQueue())
        if step.kind is StepKind.NONE:
            return
        if step.kind is StepKind.ADOPT:
            self._run(key, self._adopt(task))
        elif step.kind in (StepKind.AWAIT_ID, StepKind.PARK):
            queue.discard(key)
            if task.waiting_reason != step.reason:
                self._run(key, self._write_waiting(task, step.reason, step.message))
        elif step.kind is StepKind.WAIT:
            queue.discard(key)
            assert step.at is not None
            self._schedule(Kind.SUBMIT, key, step.at)
        elif step.kind is StepKind.FAIL:
            queue.discard(key)
            self._run(key, self._fail(task.ref, step.reason, step.message, reason=step.reason))
        else:
            assert state is not None
            queue.wait(key, task.created_at)
            free = queue.free_slots(state.spec.max_in_flight)
            if free == 0 and task.phase is not Phase.QUEUED and key not in self._busy:
                self._run(
                    key,
                    self._write_waiting(
                        task, WaitReason.QUEUED, "the provider's maxInFlight is reached"
                    ),
                )
            self._pump(task.provider_key)

    def _reconsider_provider_tasks(self, provider_key: ProviderKey) -> None:
        for task in [t for t in self.tasks.values() if t.provider_key == provider_key]:
            self._reconcile(task, None)

    def _pump(self, provider_key: ProviderKey) -> None:
        """Start submissions for the oldest waiting tasks that fit the provider's cap."""
        if not self.active:
            return
        state = self.providers.get(provider_key)
        queue = self.queues.get(provider_key)
        if state is None or queue is None or not state.ready or not len(queue):
            return
        room = self.settings.submit_concurrency - self._submitting
        if room <= 0:
            return
        for key in queue.admit(state.spec.max_in_flight, limit=room):
            task = self.tasks.get(key)
            if task is None or key in self._busy:
                queue.discard(key)
                continue
            self._submitting += 1
            self._run(key, self._submit(task), submitting=True)

    # == scheduling ===============================================================================

    def _schedule(self, kind: Kind, key: tuple[str, str], due: dt.datetime) -> None:
        entry: EntryKey = (kind, *key)
        if self.schedule.set(entry, due.timestamp()):
            self._wake.set()

    def _wake_if_earliest(self, entry: EntryKey) -> None:
        due = self.schedule.due_of(entry)
        head = self.schedule.next_due()
        if due is not None and head is not None and due <= head:
            self._wake.set()

    async def _timer_loop(self) -> None:
        """The one timer: sleep until the earliest entry, then dispatch everything due."""
        window = self.settings.poll_batch_window
        while True:
            self._wake.clear()
            head = self.schedule.next_due()
            now = self.clock().timestamp()
            if head is None or head > now:
                timeout = None if head is None else head - now
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                continue
            if window > 0:
                await asyncio.sleep(window)  # gather what falls due together: one bulk request
            due = self.schedule.pop_due(self.clock().timestamp())
            self._dispatch(due)
            await asyncio.sleep(0)

    def _dispatch(self, entries: Iterable[EntryKey]) -> None:
        polls: dict[ProviderKey, list[TaskKey]] = {}
        for kind, namespace, name in entries:
            key = (namespace, name)
            if kind is Kind.PROVIDER:
                if key not in self._checking:
                    self._checking.add(key)
                    self._spawn(self._check_provider(key))
                continue
            task = self.tasks.get(key)
            if task is None:
                continue
            if kind is Kind.POLL:
                polls.setdefault(task.provider_key, []).append(key)
            elif kind is Kind.DEADLINE:
                if not task.terminal and not self._run(
                    key,
                    self._fail(task.ref, FailureCode.DEADLINE_EXCEEDED, DEADLINE_MESSAGE),
                    retry_kind=Kind.DEADLINE,
                ):
                    self._schedule(Kind.DEADLINE, key, self.clock() + BUSY_RETRY)
            elif kind is Kind.TTL:
                self._spawn(self._delete(task))
            elif kind is Kind.SUBMIT:
                self._reconcile(task, None)
        for provider_key, keys in polls.items():
            self._spawn(self._poll_batch(provider_key, keys))

    # == running actions ==========================================================================

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)

    def _run(
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
        if key in self._busy:
            coro.close()
            if submitting:
                self._submitting -= 1
            return False
        self._busy.add(key)

        async def wrapper() -> None:
            try:
                await coro
            except kube.KubeError as exc:
                logger.warning("action on %s/%s postponed: %s", *key, exc)
                entry_kind = retry_kind or Kind.SUBMIT
                self._schedule(
                    entry_kind, key, self.clock() + dt.timedelta(seconds=API_RETRY_SECONDS)
                )
            except Exception:
                logger.exception("action on %s/%s failed", *key)
                self._schedule(
                    Kind.SUBMIT, key, self.clock() + dt.timedelta(seconds=API_RETRY_SECONDS)
                )
            finally:
                self._busy.discard(key)
                if submitting:
                    self._submitting -= 1
                task = self.tasks.get(key)
                if task is not None and self.active:
                    if task.phase is not Phase.SUBMITTED and not task.terminal:
                        queue = self.queues.get(task.provider_key)
                        if queue is not None and submitting:
                            queue.discard(key)
                        self._reconcile(task, None)
                    if submitting:
                        self._pump(task.provider_key)
                elif task is None and submitting:
                    for queue in self.queues.values():
                        queue.discard(key)

        self._spawn(wrapper())
        return True

    def _remember(self, view: TaskView | None) -> TaskRecord | None:
        """Adopt a body we just read or wrote as the freshest record of that task."""
        if view is None:
            return None
        record = TaskRecord.from_view(view, now=self.clock())
        old = self.tasks.get(record.key)
        if old is not None and old.ref.uid != record.ref.uid:
            return record
        self.tasks[record.key] = record
        if record.terminal or record.phase is Phase.SUBMITTED:
            self._reconcile(record, old)
        return record

    def _event(self, ref: TaskRef, type_: EventType, reason: str, message: str) -> None:
        self.events.emit(ObjectRef.task(ref), type_, reason, message)

    async def _fresh(self, ref: TaskRef) -> TaskView | None:
        """GET a task; ``None`` if it is gone, being deleted, or another instance."""
        view = await self.ledger.get_task(ref.namespace, ref.name)
        if view is None or view.deleting or view.ref.uid != ref.uid:
            return None
        return view

    # == submission ===============================================================================

    async def _submit(self, task: TaskRecord) -> None:
        """Submit one task: intent (CAS) -> in.php -> Submitted (CAS); see the module docs."""
        view = await self._fresh(task.ref)
        if view is None:
            return
        record = TaskRecord.from_view(view, now=self.clock())
        self.tasks[record.key] = record
        state = self.providers.get(record.provider_key)
        step = policy.submission_step(
            record,
            provider=state.spec if state else None,
            provider_ready=bool(state and state.ready),
            provider_reason=state.reason if state else "NotFound",
            now=self.clock(),
            max_attempts=self.settings.max_submit_attempts,
            poll_only_grace=self.settings.intent_grace_seconds,
        )
        if step.kind is not StepKind.SUBMIT or state is None or state.client is None:
            return  # the wrapper re-decides from the fresh record
        spec = state.spec
        provider_label = spec.name
        pingback_url = None
        if spec.public_url is not None:
            assert self.signer is not None  # a provider without a signer is never Ready
            pingback_url = self.signer.url(spec.public_url, record.ref)
        try:
            params = provider_tasks.build_submit_params(
                view.spec, dialect=spec.dialect, pingback_url=pingback_url
            )
        except provider_tasks.SpecError as exc:
            await self._fail(record.ref, FailureCode.INVALID_SPEC, str(exc), view=view)
            return
        if step.resubmit:
            self.metrics.submissions.labels(provider_label, "resubmitted").inc()
            self._event(
                record.ref,
                EventType.WARNING,
                "Resubmitting",
                "no provider task id was recorded for the submission started at "
                f"{model.format_time(record.intent_at or self.clock())} and no pingback came; "
                f"submitting again (attempt {record.attempts + 1} of "
                f"{self.settings.max_submit_attempts})",
            )
        previous: Mapping[str, Any] = view.status.get("submission") or {}
        attempts = record.attempts
        intent_at = self.clock()
        intent = {
            "phase": str(view.phase or Phase.PENDING),
            "submission": {
                **{k: v for k, v in previous.items() if k != "nextAttemptAt"},
                "intentAt": model.format_time(intent_at),
                "attempts": attempts + 1,
            },
        }
        pinned = await self.ledger.update_status(view, intent, pin_version=True)
        self.counters.status_writes += 1
        if pinned is None:
            return  # someone changed the task since our GET: re-decide
        self.tasks[record.key] = TaskRecord.from_view(pinned, now=self.clock())
        self.counters.submits += 1
        try:
            provider_task_id = await state.client.submit(params)
        except ProviderError as exc:
            await self._submit_failed(pinned, state, exc, attempts=attempts)
            return
        self.metrics.submissions.labels(provider_label, "submitted").inc()
        await self._write_submitted(
            pinned,
            provider_task_id=provider_task_id,
            provider=spec,
            submitted_at=self.clock(),
            reason="Submitted",
            message=f"submitted to {spec.name} as provider task {provider_task_id}",
        )

    async def _submit_failed(
        self, view: TaskView, state: ProviderState, exc: ProviderError, *, attempts: int
    ) -> None:
        """Record why in.php failed: fail, park, or back off with the documented wait."""
        classification = exc.classification
        label = state.spec.name
        verdict = classification.effective_verdict
        if verdict is Verdict.TASK_FAILED:
            self.metrics.submissions.labels(label, "task_failed").inc()
            await self._fail(view.ref, classification.code, classification.reason, view=view)
            return
        now = self.clock()
        ambiguous = policy.is_ambiguous(classification)
        if verdict is Verdict.CONFIG_ERROR:
            self.metrics.submissions.labels(label, "config_error").inc()
            wait = self.settings.provider_retry_seconds
            self._mark_not_ready(
                state, policy.provider_verdict(state.spec.dialect, error=classification)
            )
        else:
            self.metrics.submissions.labels(
                label, "ambiguous" if ambiguous else "retry_later"
            ).inc()
            wait = classification.wait_seconds or DEFAULT_POLL_ERROR_WAIT
        previous: Mapping[str, Any] = view.status.get("submission") or {}
        fields = {
            "submission": {
                **previous,
                # A definite rejection created nothing remotely: it costs no attempt.
                "attempts": attempts + 1 if ambiguous else attempts,
                "nextAttemptAt": model.format_time(now + dt.timedelta(seconds=wait)),
                "lastError": f"{classification.code}: {classification.reason}"[:1024],
            }
        }
        written = await self.ledger.update_status(view, fields, pin_version=True)
        self.counters.status_writes += 1
        if written is None:
            written = await self._fresh(view.ref)
        if written is not None:
            self.tasks[view.ref.namespace, view.ref.name] = TaskRecord.from_view(
                written, now=self.clock()
            )
        if verdict is not Verdict.CONFIG_ERROR:
            self._event(
                view.ref,
                EventType.WARNING,
                "SubmitRetry",
                f"in.php answered {classification.code}; retrying in {wait:g}s",
            )

    async def _write_submitted(
        self,
        view: TaskView,
        *,
        provider_task_id: str,
        provider: ProviderSpec,
        submitted_at: dt.datetime,
        reason: str,
        message: str,
    ) -> None:
        """Write ``Submitted`` with the provider id, retrying lost races until settled."""
        current: TaskView | None = view
        for _ in range(MAX_CAS_RETRIES):
            if current is None or current.deleting or (current.phase and current.phase.terminal):
                break  # gone, or a pingback already delivered the result: nothing to add
            if current.provider_task_id not in (None, provider_task_id):
                break
            probe = replace(
                TaskRecord.from_view(current, now=self.clock()), submitted_at=submitted_at
            )
            first_poll = policy.first_poll_at(probe, provider)
            fields = {
                "phase": str(Phase.SUBMITTED),
                "providerTaskId": provider_task_id,
                "submittedAt": model.format_time(submitted_at),
                "nextPollAt": model.format_time(first_poll),
                "polls": 0,
                "observedGeneration": current.generation,
                "conditions": set_condition(
                    current.status.get("conditions") or [],
                    type_=CONDITION_SUBMITTED,
                    status="True",
                    reason=reason,
                    message=message,
                    generation=current.generation,
                    now=submitted_at,
                ),
            }
            written = await self.ledger.update_status(current, fields, pin_version=True)
            self.counters.status_writes += 1
            if written is not None:
                self._event(written.ref, EventType.NORMAL, reason, message)
                self._remember(written)
                await self._label(written.ref, provider_task_id)
                return
            current = await self._fresh(view.ref)
        self._remember(await self._fresh(view.ref))

    async def _label(self, ref: TaskRef, provider_task_id: str) -> None:
        """Put the provider id on a label (dead-letter matching); best effort."""
        body = {"metadata": {"labels": {model.PROVIDER_TASK_ID_LABEL: provider_task_id}}}
        try:
            await self.client.patch(kube.TASKS, ref.namespace, ref.name, body)
        except kube.KubeError as exc:
            logger.debug("label not set on %s/%s: %s", ref.namespace, ref.name, exc)

    async def _adopt(self, task: TaskRecord) -> None:
        """A task created with spec.providerTaskId goes straight to Submitted (no in.php)."""
        view = await self._fresh(task.ref)
        if view is None or view.spec_provider_task_id is None:
            return
        if view.phase is Phase.SUBMITTED or (view.phase and view.phase.terminal):
            self._remember(view)
            return
        state = self.providers.get((view.ref.namespace, view.provider))
        if state is None:
            await self._write_waiting(
                TaskRecord.from_view(view, now=self.clock()),
                WaitReason.PROVIDER_NOT_FOUND,
                f"CaptchaProvider {view.provider!r} does not exist",
            )
            return
        # An adopted task was submitted by the app just before it created the object; an
        # external task's id arrives later (sidecar `track`), right after its submission.
        submitted_at = self.clock() if view.external else (view.created_at or self.clock())
        await self._write_submitted(
            view,
            provider_task_id=view.spec_provider_task_id,
            provider=state.spec,
            submitted_at=submitted_at,
            reason="Adopted",
            message=f"adopted provider task {view.spec_provider_task_id}: polling only",
        )

    async def _write_waiting(self, task: TaskRecord, reason: str, message: str) -> None:
        """Record why a task waits (condition Submitted=False), once per reason."""
        view = await self._fresh(task.ref)
        if view is None or view.phase is Phase.SUBMITTED or (view.phase and view.phase.terminal):
            self._remember(view)
            return
        now = self.clock()
        queued = reason == WaitReason.QUEUED
        phase = Phase.QUEUED if queued else (view.phase or Phase.PENDING)
        fields: dict[str, Any] = {
            "phase": str(phase),
            "observedGeneration": view.generation,
            "conditions": set_condition(
                view.status.get("conditions") or [],
                type_=CONDITION_SUBMITTED,
                status="False",
                reason=reason,
                message=message,
                generation=view.generation,
                now=now,
            ),
        }
        if queued and "queuedAt" not in view.status:
            fields["queuedAt"] = model.format_time(now)
        written = await self.ledger.update_status(view, fields, pin_version=True)
        self.counters.status_writes += 1
        if written is not None:
            self.tasks[task.key] = TaskRecord.from_view(written, now=now)
            event_type = (
                EventType.WARNING
                if reason in (WaitReason.PROVIDER_NOT_READY, WaitReason.PROVIDER_NOT_FOUND)
                else EventType.NORMAL
            )
            self._event(view.ref, event_type, "Queued" if queued else reason, message)

    # == failing and deleting =====================================================================

    async def _fail(
        self,
        ref: TaskRef,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        view: TaskView | None = None,
    ) -> None:
        """Fail a task with ``code`` unless it already has an outcome (CAS, re-read on loss)."""
        current = view
        for _ in range(MAX_CAS_RETRIES):
            if current is None:
                current = await self._fresh(ref)
            if current is None or (current.phase and current.phase.terminal):
                self._remember(current)
                return
            now = self.clock()
            fields = result_status(
                current,
                Result.failed(
                    code=code,
                    message=message,
                    delivered_by=DeliveredBy.POLL,
                    provider_task_id=current.known_provider_task_id,
                ),
                now,
            )
            fields.pop("deliveredBy", None)  # the operator decided this, no delivery path did
            for condition in fields["conditions"]:
                if condition.get("type") == CONDITION_COMPLETE:
                    condition["reason"] = reason or _camel(code)
            written = await self.ledger.update_status(current, fields, pin_version=True)
            self.counters.status_writes += 1
            if written is not None:
                self.metrics.ensure_provider(written.provider)
                self.metrics.permanent_failures.labels(written.provider, failure_label(code)).inc()
                self._event(ref, EventType.WARNING, "Failed", f"{code}: {message}")
                self._remember(written)
                return
            current = None
        raise kube.KubeUnavailable(f"{ref.namespace}/{ref.name}: write contention")

    async def _delete(self, task: TaskRecord) -> None:
        """TTL: delete a finished task, only if it is still the same instance."""
        try:
            await self.client.delete(
                kube.TASKS, task.ref.namespace, task.ref.name, uid=task.ref.uid
            )
        except kube.ApiError as exc:
            if not (exc.not_found or exc.conflict):
                logger.warning("TTL delete of %s/%s failed: %s", *task.key, exc)
        except kube.KubeUnavailable:
            self._schedule(
                Kind.TTL, task.key, self.clock() + dt.timedelta(seconds=API_RETRY_SECONDS)
            )

    # == fallback polling =========================================================================

    async def _poll_batch(self, provider_key: ProviderKey, keys: list[TaskKey]) -> None:
        """Poll the tasks of one provider that came due together (one bulk request)."""
        async with self._poll_sem:
            state = self.providers.get(provider_key)
            now = self.clock()
            if state is None or state.client is None:
                # Results can still be fetched while the provider is "not Ready" for lack of
                # threads or balance; only a missing client (no usable key yet) stops polling.
                unchecked = state is not None and not state.checked
                later = now + (
                    UNCHECKED_RETRY
                    if unchecked
                    else dt.timedelta(seconds=self.settings.provider_retry_seconds)
                )
                for key in keys:
                    if key in self.tasks:
                        self._schedule(Kind.POLL, key, later)
                return
            by_id: dict[str, TaskRecord] = {}
            for key in keys:
                task = self.tasks.get(key)
                if task is None or task.terminal:
                    continue
                if key in self._busy:
                    self._schedule(Kind.POLL, key, now + BUSY_RETRY)
                    continue
                provider_task_id = task.known_provider_task_id
                if provider_task_id is None:
                    continue
                by_id[provider_task_id] = task
            if not by_id:
                return
            self.counters.poll_requests += 1
            try:
                results = await state.client.get_results(list(by_id))
            except ProviderError as exc:
                self._poll_request_failed(state, by_id.values(), exc)
                return
            await asyncio.gather(
                *(
                    self._after_poll(state, by_id[pid], result)
                    for pid, result in results.items()
                    if pid in by_id
                )
            )

    def _poll_request_failed(
        self, state: ProviderState, tasks: Iterable[TaskRecord], exc: ProviderError
    ) -> None:
        classification = exc.classification
        if classification.effective_verdict is Verdict.CONFIG_ERROR:
            self._mark_not_ready(
                state, policy.provider_verdict(state.spec.dialect, error=classification)
            )
            wait = self.settings.provider_retry_seconds
        else:
            wait = max(
                classification.wait_seconds or DEFAULT_POLL_ERROR_WAIT,
                self.settings.poll_batch_window,
            )
        later = self.clock() + dt.timedelta(seconds=wait)
        for task in tasks:
            self.metrics.fallback_polls.labels(state.spec.name, str(PollOutcome.ERROR)).inc()
            self._schedule(Kind.POLL, task.key, later)

    async def _after_poll(self, state: ProviderState, task: TaskRecord, result: PollResult) -> None:
        """Apply one task's poll result; on an API failure, poll again soon (nothing lost)."""
        try:
            await self._apply_poll(state, task, result)
        except Exception as exc:  # noqa: BLE001 - one task's failure must not stop its batch
            logger.warning("poll result of %s/%s not applied: %r", *task.key, exc)
            self._schedule(
                Kind.POLL, task.key, self.clock() + dt.timedelta(seconds=API_RETRY_SECONDS)
            )

    async def _apply_poll(self, state: ProviderState, task: TaskRecord, result: PollResult) -> None:
        async with self._record_sem:
            outcome = policy.classify_poll(result)
            label = state.spec.name
            self.counters.polls += 1
            self.metrics.fallback_polls.labels(label, str(outcome)).inc()
            provider_task_id = task.known_provider_task_id
            if isinstance(result, Solution):
                recorded = await self.ledger.record(
                    task.ref,
                    Result.solved(
                        token=result.token,
                        delivered_by=DeliveredBy.POLL,
                        provider_task_id=provider_task_id,
                        user_agent=result.user_agent,
                    ),
                )
                if recorded.outcome is Outcome.RECORDED:
                    self.metrics.fallback_recoveries.labels(label).inc()
                    self._event(
                        task.ref,
                        EventType.NORMAL,
                        "Solved",
                        "solved; recovered by fallback poll (no pingback arrived in time)",
                    )
                self._remember(recorded.task)
                return
            if outcome is PollOutcome.FAILED:
                recorded = await self.ledger.record(
                    task.ref,
                    Result.failed(
                        code=result.code,
                        message=result.reason,
                        delivered_by=DeliveredBy.POLL,
                        provider_task_id=provider_task_id,
                    ),
                )
                if recorded.outcome is Outcome.RECORDED:
                    self.metrics.permanent_failures.labels(label, failure_label(result.code)).inc()
                    self._event(
                        task.ref, EventType.WARNING, "Failed", f"{result.code}: {result.reason}"
                    )
                self._remember(recorded.task)
                return
            if outcome is PollOutcome.EXPIRED:
                await self._fail(
                    task.ref,
                    FailureCode.RESULT_EXPIRED,
                    f"{result.code}: the provider no longer holds this task's result",
                )
                return
            wait = result.wait_seconds if outcome is PollOutcome.UNKNOWN else None
            plan = policy.after_poll(
                polls_before=self.polls.get(task.key, task.polls),
                provider=state.spec,
                now=self.clock(),
                checkpoint_every=self.settings.poll_status_every,
                wait_seconds=wait,
            )
            self.polls[task.key] = plan.polls
            if plan.exhausted:
                await self._fail(
                    task.ref,
                    FailureCode.POLLS_EXHAUSTED,
                    f"not ready after {plan.polls} polls (spec.polling.maxPolls)",
                )
                return
            assert plan.next_due is not None
            self._schedule(Kind.POLL, task.key, plan.next_due)
            if plan.checkpoint:
                now = self.clock()
                written = await self.ledger.update_status(
                    _minimal_view(task, Phase.SUBMITTED),
                    {
                        "polls": plan.polls,
                        "lastPollAt": model.format_time(now),
                        "nextPollAt": model.format_time(plan.next_due),
                    },
                )
                self.counters.status_writes += 1
                if written is not None:
                    self.tasks[task.key] = TaskRecord.from_view(written, now=now)

    # == providers ================================================================================

    def _mark_not_ready(self, state: ProviderState, verdict: policy.ProviderVerdict) -> None:
        """A request just failed with a configuration error: stop submitting, re-check soon."""
        if state.ready:
            state.ready = False
            state.reason = verdict.reason
            state.message = verdict.message
            self.metrics.provider_ready.labels(state.spec.name).set(0)
        self._schedule(
            Kind.PROVIDER,
            state.spec.key,
            self.clock() + dt.timedelta(seconds=self.settings.provider_retry_seconds),
        )

    async def _check_provider(self, key: ProviderKey) -> None:
        """Read the key Secret, check the account, write the provider status, reschedule."""
        try:
            state = self.providers.get(key)
            if state is None:
                return
            verdict = await self._probe(state)
            await self._apply_verdict(state, verdict)
        except kube.KubeError as exc:
            logger.warning("provider check of %s/%s postponed: %s", *key, exc)
            self._schedule(
                Kind.PROVIDER, key, self.clock() + dt.timedelta(seconds=API_RETRY_SECONDS)
            )
        finally:
            self._checking.discard(key)

    async def _probe(self, state: ProviderState) -> policy.ProviderVerdict:
        spec = state.spec
        state.threads = None
        state.balance = None
        if spec.public_url is not None and self.signer is None:
            return policy.ProviderVerdict(
                False,
                policy.ProviderReason.PINGBACK_KEY_MISSING,
                "spec.pingback.publicURL is set but the operator has no pingback key file",
            )
        try:
            secret = await self.client.get(kube.SECRETS, spec.namespace, spec.secret_name)
        except kube.ApiError as exc:
            if exc.not_found:
                return policy.ProviderVerdict(
                    False,
                    policy.ProviderReason.SECRET_NOT_FOUND,
                    f"Secret {spec.secret_name!r} not found",
                )
            raise
        api_key = _secret_value(secret, spec.secret_key)
        if not api_key:
            return policy.ProviderVerdict(
                False,
                policy.ProviderReason.SECRET_KEY_MISSING,
                f"Secret {spec.secret_name!r} has no key {spec.secret_key!r}",
            )
        version = f"{secret.get('metadata', {}).get('resourceVersion', '')}/{spec.secret_key}"
        if (
            state.client is None
            or state.key_version != version
            or state.client_generation != spec.generation
        ):
            state.client = ProviderClient(
                session=self.http,
                base_url=spec.base_url,
                api_key=api_key,
                dialect=spec.dialect,
                timeout=self.settings.provider_timeout,
                transport_retries=self.settings.provider_transport_retries,
                observer=self.metrics.observer(spec.name),
                bulk_results=None if spec.polling.bulk else False,
            )
            state.key_version = version
            state.client_generation = spec.generation
        try:
            if spec.dialect is Dialect.CAPTCHAAI:
                state.threads = await state.client.threads_info()
                return policy.provider_verdict(spec.dialect, threads=state.threads)
            state.balance = await state.client.get_balance()
            return policy.provider_verdict(spec.dialect, balance=state.balance)
        except ProviderError as exc:
            return policy.provider_verdict(spec.dialect, error=exc.classification)

    async def _apply_verdict(self, state: ProviderState, verdict: policy.ProviderVerdict) -> None:
        spec = state.spec
        was_ready = state.ready
        first_check = not state.checked
        state.checked = True
        state.ready = verdict.ready
        state.reason = verdict.reason
        state.message = verdict.message
        self.metrics.provider_ready.labels(spec.name).set(1 if verdict.ready else 0)
        now = self.clock()
        queue = self.queues.setdefault(spec.key, ProviderQueue())
        status: dict[str, Any] = {
            "checkedAt": model.format_time(now),
            "observedGeneration": spec.generation,
            "inFlight": len(queue.in_flight),
            "conditions": set_condition(
                spec.conditions,
                type_="Ready",
                status="True" if verdict.ready else "False",
                reason=verdict.reason,
                message=verdict.message,
                generation=spec.generation,
                now=now,
            ),
        }
        if state.threads is not None:
            status["threads"] = state.threads.threads
            status["workingThreads"] = state.threads.working_threads
        if state.balance is not None:
            status["balance"] = f"{state.balance:g}"
        if verdict.error_code is not None or not verdict.ready:
            status["lastError"] = {
                "code": verdict.error_code or verdict.reason,
                "message": verdict.message[:1024],
                "at": model.format_time(now),
            }
        try:
            body = await self.client.patch(
                kube.PROVIDERS,
                spec.namespace,
                spec.name,
                {"status": status},
                subresource="status",
            )
        except kube.ApiError as exc:
            if not exc.not_found:
                raise
        else:
            self._store_provider(body)
        provider_ref = ObjectRef(model.PROVIDER_KIND, spec.namespace, spec.name, spec.uid)
        if verdict.ready and not was_ready:
            self.events.emit(provider_ref, EventType.NORMAL, "Ready", verdict.message)
        elif not verdict.ready and (
            was_ready or first_check or state.error_code != verdict.error_code
        ):
            self.events.emit(provider_ref, EventType.WARNING, str(verdict.reason), verdict.message)
        if was_ready != verdict.ready or first_check:
            self._reconsider_provider_tasks(spec.key)
            self._pump(spec.key)
        state.error_code = verdict.error_code
        wait = spec.recheck_seconds if verdict.ready else self.settings.provider_retry_seconds
        self._schedule(Kind.PROVIDER, spec.key, now + dt.timedelta(seconds=wait))

    # == introspection ============================================================================

    def task_counts(self) -> dict[tuple[str, str], int]:
        """(provider, phase) -> count, for the ``captchatask_tasks`` gauge."""
        counts: Counter[tuple[str, str]] = Counter()
        for task in self.tasks.values():
            counts[(task.provider, str(task.phase or Phase.PENDING))] += 1
        return dict(counts)

    def refresh_gauges(self) -> None:
        """Recompute gauges from the in-memory index (called on scrape)."""
        self.metrics.set_task_counts(self.task_counts())


def _secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """Decode one key of a Secret (``data`` is base64; ``stringData`` never comes back)."""
    data: Mapping[str, Any] = secret.get("data") or {}
    raw = data.get(key)
    if not isinstance(raw, str):
        return None
    try:
        value = base64.b64decode(raw, validate=True).decode("utf-8").strip()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return value or None
