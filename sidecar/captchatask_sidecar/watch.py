"""One shared watch of the namespace's tasks, fanned out to the local API's long-polls.

A ``GET /v1/tasks/{name}?wait=60`` must return within ~100 ms of the result reaching the
ledger, however it got there (this sidecar's pingback, another replica, the operator's poll, a
dead-letter requeue). Every waiter shares one watch instead of opening its own:

* the watch starts from a cheap ``limit=1`` list's resourceVersion, asks for bookmarks, and
  resumes from the last seen resourceVersion after a disconnect; a ``410 Gone`` restarts it
  from a fresh list;
* after every (re)list, each waited-for task is re-read once, so a result that landed while
  the watch was down is not missed;
* results recorded by this sidecar are also published directly by the recorder, so a
  pingback's long-poll does not even wait for the watch event;
* the watch runs only while someone waits (and :data:`LINGER_SECONDS` after the last one left),
  so a receiver whose app never long-polls costs the API server no watch stream at all - on
  the ledger path every recorded pingback would otherwise come back as a full watch event.

Events for tasks nobody waits for are dropped without being parsed further.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Final

from captchatask import kube
from captchatask.model import TaskView
from captchatask_sidecar.metrics import Metrics

logger = logging.getLogger(__name__)

#: Server-side watch timeout; the watch is resumed from the last resourceVersion afterwards.
WATCH_SECONDS: Final = 300
INITIAL_BACKOFF_SECONDS: Final = 0.1
MAX_BACKOFF_SECONDS: Final = 2.0
HTTP_GONE: Final = 410
#: How long the watch stays up after the last waiter left (long-polls come in series).
LINGER_SECONDS: Final = 60.0


@dataclass(eq=False)
class Waiter:
    """One long-poll waiting for one task to finish (or disappear)."""

    name: str
    uid: str | None = None
    future: asyncio.Future[tuple[TaskView, bool]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class TaskHub:
    """The shared watch and its waiters.

    Parameters
    ----------
    client
        The API client.
    namespace
        The namespace whose tasks are watched (the pod's).
    metrics
        The sidecar's metrics (watch restarts).
    """

    def __init__(self, client: kube.KubeClient, namespace: str, metrics: Metrics) -> None:
        self.client = client
        self.namespace = namespace
        self.metrics = metrics
        self._waiters: dict[str, set[Waiter]] = {}
        self.connected = asyncio.Event()
        self._demand = asyncio.Event()
        self._idle_since = 0.0

    # -- waiters ------------------------------------------------------------------------------

    def subscribe(self, name: str) -> Waiter:
        """Register before reading the task, so nothing between the read and the wait is lost."""
        waiter = Waiter(name=name)
        self._waiters.setdefault(name, set()).add(waiter)
        self._demand.set()
        return waiter

    def unsubscribe(self, waiter: Waiter) -> None:
        """Forget a waiter (idempotent)."""
        waiters = self._waiters.get(waiter.name)
        if waiters is None:
            return
        waiters.discard(waiter)
        if not waiters:
            del self._waiters[waiter.name]
        if not self._waiters:
            self._idle_since = asyncio.get_running_loop().time()

    def publish(self, task: TaskView, *, deleted: bool = False) -> None:
        """Wake the waiters of a task that finished or was deleted."""
        if task.ref.namespace != self.namespace:
            return
        waiters = self._waiters.get(task.ref.name)
        if not waiters:
            return
        finished = task.phase is not None and task.phase.terminal
        if not (finished or deleted):
            return
        for waiter in waiters:
            if waiter.uid is not None and task.ref.uid and waiter.uid != task.ref.uid:
                continue
            if not waiter.future.done():
                waiter.future.set_result((task, deleted))

    @property
    def waiting(self) -> int:
        """Number of tasks with at least one waiter."""
        return len(self._waiters)

    # -- the watch ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the watch whenever someone waits (cancelled at shutdown)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._demand.wait()
            follower = asyncio.create_task(self._follow(), name="task-watch-stream")
            try:
                while True:
                    await asyncio.sleep(LINGER_SECONDS / 4)
                    idle = loop.time() - self._idle_since
                    if not self._waiters and idle >= LINGER_SECONDS:
                        break
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
                self.connected.clear()
            if not self._waiters:
                self._demand.clear()

    async def _follow(self) -> None:
        """Keep one watch stream alive, resuming or relisting as needed."""
        resource_version: str | None = None
        backoff = INITIAL_BACKOFF_SECONDS
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._list()
                    await self._resync()
                self.connected.set()
                resource_version = await self._watch(resource_version)
                backoff = INITIAL_BACKOFF_SECONDS
            except kube.ApiError as exc:
                if exc.status == HTTP_GONE:
                    resource_version = None
                    continue
                backoff = await self._restart(backoff, exc)
            except (kube.KubeUnavailable, ValueError) as exc:
                backoff = await self._restart(backoff, exc)
            except Exception as exc:
                # A bug. Uncaught, it ended the stream unseen while the hub still counted it as
                # up, and the long-polls then waited out their timeouts for results written by
                # anyone but this sidecar. Restart from a fresh list, which re-reads every
                # waited-for task.
                logger.exception("task watch failed; restarting it from a fresh list")
                resource_version = None
                backoff = await self._restart(backoff, exc)

    async def _restart(self, delay: float, exc: Exception) -> float:
        """Count, wait ``delay``; return the back-off for the next restart (doubled, capped)."""
        self.connected.clear()
        self.metrics.watch_restarts.inc()
        logger.debug("task watch interrupted (%s); restarting in %.2fs", type(exc).__name__, delay)
        await asyncio.sleep(delay)
        return min(delay * 2, MAX_BACKOFF_SECONDS)

    async def _list(self) -> str:
        listing = await self.client.request(
            "GET", kube.TASKS.path(self.namespace), params={"limit": "1"}
        )
        return str((listing.get("metadata") or {}).get("resourceVersion", "")) or "0"

    async def _resync(self) -> None:
        """Re-read every waited-for task once (after a relist: events may have been missed)."""
        for name in list(self._waiters):
            try:
                body = await self.client.get(kube.TASKS, self.namespace, name)
            except kube.ApiError as exc:
                if exc.not_found:
                    stub = {"metadata": {"namespace": self.namespace, "name": name}}
                    self.publish(TaskView.from_body(stub), deleted=True)
                continue
            self.publish(TaskView.from_body(body))

    async def _watch(self, resource_version: str) -> str | None:
        """Follow one watch connection; return where to resume (``None``: relist)."""
        async for event in self.client.watch(
            kube.TASKS,
            self.namespace,
            resource_version=resource_version,
            timeout_seconds=WATCH_SECONDS,
        ):
            kind = event.get("type")
            obj: dict[str, Any] = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == HTTP_GONE:
                    return None
                raise kube.KubeUnavailable(f"watch error: {obj.get('reason')}")
            meta: dict[str, Any] = obj.get("metadata") or {}
            resource_version = str(meta.get("resourceVersion") or resource_version)
            if kind == "BOOKMARK" or meta.get("name") not in self._waiters:
                continue
            self.publish(TaskView.from_body(obj), deleted=kind == "DELETED")
        return resource_version
