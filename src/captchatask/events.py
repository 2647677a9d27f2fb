"""Kubernetes Events (core/v1) for our objects, posted without ever blocking the caller.

Both components tell humans what happened to a task through Events (``kubectl describe
ctask``): the operator on every transition it makes, the sidecar when a pingback lands. Events
are a courtesy, not the ledger: losing one must never delay or fail a status write, so
:class:`EventRecorder` queues them (bounded; the oldest are dropped under pressure and counted)
and one background task posts them, supervised (:mod:`captchatask.supervise`: a bug that
raises in it is logged and the poster restarted, not silently ended). :func:`build_event` is
the pure part.

Routine Events. Every task that goes well makes the same two transitions, ``Submitted`` and
``Solved``; an Event for each is a write and about 1 KiB of etcd per task (until ``--event-ttl``
expires it), as much as the task itself, and tells nobody anything the task's status and
conditions do not. :func:`is_routine` names them, so a component can skip them unless asked to
keep every Event; warnings and the unusual transitions are always posted.

Messages must never contain an API key or the pingback HMAC key; callers pass fixed sentences
and codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from captchatask import kube, model
from captchatask.supervise import Supervisor

logger = logging.getLogger(__name__)

#: Events queued beyond this are dropped (oldest first): a stuck API server must not grow memory.
DEFAULT_MAX_QUEUE: Final = 1000
#: The API server rejects longer messages.
MAX_MESSAGE_LENGTH: Final = 1024
#: Per-request budget for posting one Event.
POST_TIMEOUT_SECONDS: Final = 5.0
#: Reasons of the Normal Events every successful task would get (see the module docstring).
ROUTINE_REASONS: Final = frozenset({"Submitted", "Solved"})


class EventType(StrEnum):
    """The two Event types Kubernetes knows."""

    NORMAL = "Normal"
    WARNING = "Warning"


def is_routine(type_: EventType, reason: str) -> bool:
    """Whether an Event only repeats the happy path (skippable; warnings never are)."""
    return type_ is EventType.NORMAL and reason in ROUTINE_REASONS


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """The object an Event is about."""

    kind: str
    namespace: str
    name: str
    uid: str
    api_version: str = model.API_VERSION

    @classmethod
    def task(cls, ref: model.TaskRef) -> ObjectRef:
        """Refer to a CaptchaTask instance."""
        return cls(model.TASK_KIND, ref.namespace, ref.name, ref.uid)


def build_event(
    *,
    involved: ObjectRef,
    type_: EventType,
    reason: str,
    message: str,
    component: str,
    instance: str,
    now: dt.datetime,
) -> dict[str, Any]:
    """Return a core/v1 Event body (pure)."""
    stamp = model.format_time(now.replace(microsecond=0))
    micro = model.format_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            # kubectl's convention: <object>.<unique suffix>; generateName would cost nothing
            # more but makes the name unknowable to the caller.
            "name": f"{involved.name[:200]}.{secrets.token_hex(8)}",
            "namespace": involved.namespace,
        },
        "involvedObject": {
            "apiVersion": involved.api_version,
            "kind": involved.kind,
            "namespace": involved.namespace,
            "name": involved.name,
            "uid": involved.uid,
        },
        "type": str(type_),
        "reason": reason,
        "message": message[:MAX_MESSAGE_LENGTH],
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "eventTime": micro,
        "action": reason,
        "count": 1,
    }


async def post(client: kube.KubeClient, body: dict[str, Any]) -> bool:
    """Post one Event; ``False`` (and a debug log) if the API server refused or was away."""
    try:
        await client.create(
            kube.EVENTS, body["metadata"]["namespace"], body, timeout=POST_TIMEOUT_SECONDS
        )
    except kube.KubeError as exc:
        logger.debug("event not posted: %s", type(exc).__name__)
        return False
    return True


class EventRecorder:
    """A bounded queue of Events and the one task that posts them.

    Parameters
    ----------
    client
        The component's API client.
    component
        ``source.component`` / ``reportingComponent`` (``captchatask-operator``...).
    instance
        ``reportingInstance`` (the pod name).
    clock
        Source of "now".
    enabled
        ``False`` turns :meth:`emit` into a no-op (``--no-events``).
    max_queue
        Queue bound; see :data:`DEFAULT_MAX_QUEUE`.

    Attributes
    ----------
    poster
        The poster's supervisor (set its ``on_crash`` to count crashes).
    """

    def __init__(
        self,
        client: kube.KubeClient,
        *,
        component: str,
        instance: str,
        clock: Callable[[], dt.datetime],
        enabled: bool = True,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        self._client = client
        self._component = component
        self._instance = instance
        self._clock = clock
        self._enabled = enabled
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task[None] | None = None
        self.poster = Supervisor(name="event poster", loop=self._run)
        self.posted = 0
        self.dropped = 0

    def emit(self, involved: ObjectRef, type_: EventType, reason: str, message: str) -> None:
        """Queue an Event; never blocks, never raises."""
        if not self._enabled:
            return
        body = build_event(
            involved=involved,
            type_=type_,
            reason=reason,
            message=message,
            component=self._component,
            instance=self._instance,
            now=self._clock(),
        )
        if self._queue.full():
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
        self._queue.put_nowait(body)

    def start(self) -> None:
        """Start the posting task (call from the running loop)."""
        if self._task is None and self._enabled:
            self._task = asyncio.create_task(self.poster.run(), name="captchatask event poster")

    async def _run(self) -> None:
        while True:
            body = await self._queue.get()
            try:
                if await post(self._client, body):
                    self.posted += 1
            finally:
                self._queue.task_done()

    async def close(self, *, drain_timeout: float = 2.0) -> None:
        """Post what is queued (briefly), then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout):
                await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
