"""The engine as its parts see it: what they share, and the few actions they may ask of it.

The parts of the engine (:mod:`~captchatask_operator.providers`,
:mod:`~captchatask_operator.submission`, :mod:`~captchatask_operator.polling`,
:mod:`~captchatask_operator.requeue`, :mod:`~captchatask_operator.endings`) act on state the
engine owns: the task index, the known providers, the schedule, the per-task action lock. They
reach it only through :class:`EngineActions`, defined here, below them, and never import
:mod:`~captchatask_operator.engine`: a reader of one part needs this page, not the whole engine,
and a test of one part needs a small fake of this interface, not a running engine.

What the parts only *use* (the API client, the ledger, the settings, the clock...) is handed to
them once, as :class:`Deps`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from captchatask import kube
from captchatask.events import EventRecorder, EventType
from captchatask.ledger import Ledger
from captchatask.model import TaskRef, TaskView
from captchatask.provider.client import ProviderClient
from captchatask.provider.replies import ThreadsInfo
from captchatask.signing import PingbackSigner
from captchatask_operator import policy
from captchatask_operator.index import TaskIndex
from captchatask_operator.metrics import Metrics
from captchatask_operator.records import ProviderSpec, TaskRecord
from captchatask_operator.schedule import Kind
from captchatask_operator.settings import Settings

TaskKey = tuple[str, str]
ProviderKey = tuple[str, str]


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
    #: Transient check failures in a row (reset by any check that got an answer).
    transient_failures: int = 0


@dataclass(slots=True)
class Counters:
    """Engine-level counters for the scaling measurement and tests."""

    submits: int = 0
    polls: int = 0
    poll_requests: int = 0
    status_writes: int = 0


@dataclass(frozen=True, slots=True)
class Deps:
    """What the engine and its parts use but do not own, wired once by the engine.

    Parameters
    ----------
    client
        API client (the operator's own session).
    ledger
        Compare-and-set task writes over ``client``.
    http
        Session for the solver API (owned by the caller).
    signer
        Pingback signer, or ``None`` when no key file is configured.
    settings
        Operator settings.
    metrics
        Metric series.
    events
        Event recorder.
    clock
        Source of "now" (UTC).
    identity
        This replica, recorded as ``receivedBy`` on dead letters it writes.
    """

    client: kube.KubeClient
    ledger: Ledger
    http: aiohttp.ClientSession
    signer: PingbackSigner | None
    settings: Settings
    metrics: Metrics
    events: EventRecorder
    clock: Callable[[], dt.datetime]
    identity: str


class EngineActions(Protocol):
    """What a part of the engine may read and ask; :class:`~.engine.Engine` implements it."""

    @property
    def tasks(self) -> TaskIndex:
        """The tasks as last seen (watch events and our own writes)."""

    @property
    def providers(self) -> Mapping[ProviderKey, ProviderState]:
        """The providers this operator serves, with what their checks found."""

    @property
    def busy(self) -> Collection[TaskKey]:
        """The tasks an action is running on (the per-task action lock)."""

    @property
    def counters(self) -> Counters:
        """Engine-level counters the parts add to."""

    @property
    def ledger_unavailable_at(self) -> dt.datetime | None:
        """The last time the API server did not answer (see ``policy.submission_step``)."""

    @property
    def ledger_unavailable_since(self) -> dt.datetime | None:
        """The first failure of the latest API server outage (see ``policy.submission_step``)."""

    def note_ledger_unavailable(self) -> None:
        """Record a call the API server did not answer (the outage the submission rule uses)."""

    async def ledger_back(self, timeout: float) -> bool:
        """Wait ``timeout`` seconds, or less: until the API server answers again after failing.

        For writers that hold what only a ledger write keeps (a poll answer, a dead letter, a
        provider task id) and retry with back-off: woken by the engine's API-server probe, they
        write within its period of the API server's return, not a back-off step later. ``True``
        if woken.
        """

    def watched(self, namespace: str) -> bool:
        """Whether this operator serves ``namespace``."""

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine in the background; cancelled when the engine deactivates."""

    def schedule_at(self, kind: Kind, key: tuple[str, str], due: dt.datetime) -> None:
        """Put (or move) one timed action on the schedule."""

    def schedule_no_later(self, kind: Kind, key: tuple[str, str], due: dt.datetime) -> None:
        """Like :meth:`schedule_at`, but never postpones an entry that is due earlier."""

    def unschedule(self, kind: Kind, key: tuple[str, str]) -> None:
        """Drop one timed action from the schedule (if it is there)."""

    def take_polls(
        self, provider_key: ProviderKey, *, by: float, limit: int
    ) -> list[tuple[TaskKey, float]]:
        """Take up to ``limit`` of a provider's polls due by ``by`` off the schedule, with due."""

    async def fresh(self, ref: TaskRef) -> TaskView | None:
        """GET a task; ``None`` if it is gone, being deleted, or another instance."""

    async def fresh_compact(self, ref: TaskRef) -> TaskView | None:
        """:meth:`fresh`, dropping the task's managedFields in the same request."""

    def store(self, view: TaskView) -> TaskRecord:
        """Store a body just read or written, without re-deciding (the caller does)."""

    def remember(self, view: TaskView | None) -> TaskRecord | None:
        """Adopt a body just read or written as the freshest record, and re-decide."""

    async def fail(
        self,
        ref: TaskRef,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        view: TaskView | None = None,
    ) -> None:
        """Fail a task with ``code`` unless it already has an outcome."""

    def event(self, ref: TaskRef, type_: EventType, reason: str, message: str) -> None:
        """Post an Event on a task instance (queued; never blocks)."""

    def provider_not_ready(self, state: ProviderState, verdict: policy.ProviderVerdict) -> None:
        """A request just failed with a configuration error: stop submitting, re-check soon."""

    def store_provider(self, body: Mapping[str, Any]) -> None:
        """Remember a provider body (our own status write)."""

    def in_flight(self, provider_key: ProviderKey) -> int:
        """How many of a provider's tasks are submitted and not finished."""

    def reconsider_provider_tasks(self, provider_key: ProviderKey) -> None:
        """Re-decide every task of a provider (its readiness changed)."""

    def pump(self, provider_key: ProviderKey) -> None:
        """Start submissions for the oldest waiting tasks that fit the provider's cap."""
